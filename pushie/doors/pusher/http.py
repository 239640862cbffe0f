# -*- test-case-name: tests.test_pusher -*-
"""
The Pusher HTTP API under C{/apps/<app_id>/}, as the Pusher server SDKs call it:

  - C{POST events}, C{POST batch_events}: trigger (all or nothing)
  - C{GET channels}, C{GET channels/<c>}, C{GET channels/<c>/users}
  - C{POST users/<id>/terminate_connections}

Every request is signed: C{auth_key} must be the app's key, C{auth_timestamp}
within 600 seconds of the server's clock, C{auth_version} C{1.0}, C{body_md5}
the MD5 of a non-empty body, and C{auth_signature} the HMAC of
L{pushie.doors.pusher.apps.api_string_to_sign}, compared in constant time.  A
request is checked whole before anything is published.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from pushie.doors.api import JSONResource, error_of, refuse, write_error, write_json
from pushie.doors.context import Door, DoorContext
from pushie.doors.pusher.apps import (
    USER_CHANNEL_PREFIX,
    App,
    Apps,
    api_string_to_sign,
    body_md5,
    is_pusher_channel,
    is_pusher_presence,
    is_valid_api_channel,
    is_valid_socket_id,
    is_valid_user_id,
)
from pushie.doors.pusher.door import TERMINATE_EVENT, PusherDoorSettings, excluding
from pushie.errors import OutcomeUnknown, PartiallyPublished, PushieError, bad_request
from pushie.limits import RateLimiter
from pushie.records import PublishRequest
from pushie.wire import InvalidJSON, dumps, loads

log = Logger()

TIMESTAMP_WINDOW = 600
MAX_CHANNELS = 100
"""Channels of one trigger (Pusher's limit)."""
MAX_BATCH = 10
"""Events of one batch trigger (Pusher's limit)."""
MAX_EVENT_NAME = 200
_EVENT_FIELDS = frozenset({"name", "data", "channel", "channels", "socket_id", "info"})
_INFO_ATTRIBUTES = frozenset({"user_count", "subscription_count"})


def api_unauthorized(message: str) -> PushieError:
    return PushieError(401, "unauthorized", message)


class PusherAPIResource(JSONResource, Door):
    """
    C{/apps/...}: the Pusher HTTP API of every configured app; with
    C{users_root}, C{/users/...} (the app named by the signed C{auth_key}).
    """

    allowed_methods = (b"GET", b"POST")

    def __init__(
        self,
        context: DoorContext,
        apps: Apps,
        settings: PusherDoorSettings,
        rate_limiter: RateLimiter,
        users_root: bool = False,
    ) -> None:
        super().__init__()
        self.take(context)
        self.apps = apps
        self.max_data_size = settings.max_data_size
        self.rate_limiter = rate_limiter
        self.users_root = users_root

    def render(self, request: Request) -> Any:
        """
        A known endpoint asked with a method it does not take: 405 with its own
        C{Allow} (before the signature is checked: which methods a path takes
        is no secret).  Other methods on unknown paths: L{JSONResource}'s 405.
        """
        allowed = _route_methods(_route_path(request, self.users_root))
        method = request.method
        if allowed and method not in allowed and not (method == b"HEAD" and b"GET" in allowed):
            allow = ", ".join(m.decode() for m in allowed)
            write_error(
                request, PushieError(405, "method_not_allowed", f"use {allow} on this path", headers={"Allow": allow})
            )
            return NOT_DONE_YET
        return super().render(request)

    def render_GET(self, request: Request) -> int:
        return self._serve(request)

    def render_POST(self, request: Request) -> int:
        return self._serve(request)

    def _serve(self, request: Request) -> int:
        try:
            d = self._route(request)
        except PushieError as e:
            self._refuse(request, e)
            return NOT_DONE_YET
        d.addCallback(lambda body: write_json(request, 200, dumps(body)))
        d.addErrback(lambda failure: self._failed(request, failure))
        return NOT_DONE_YET

    def _refuse(self, request: Request, error: PushieError) -> None:
        refuse(self, request, error, "a Pusher API request", metric_prefix="pusher_api_")

    def _failed(self, request: Request, failure: Failure) -> None:
        error = error_of(failure, log, "Pusher API request failed", self.metrics)
        if isinstance(error, OutcomeUnknown):
            # Pusher triggers carry no idempotency key: say so rather than suggest one.
            error = OutcomeUnknown(
                "the event may or may not have been triggered (the engine's answer was lost); "
                "a retry may deliver it twice"
            )
        elif isinstance(error, PartiallyPublished):
            # Its results name the Hub's channels (another app's carry a prefix): say it in words.
            error = PushieError(
                503,
                error.code,
                "the event was triggered on some channels and not on others (their Redis shard failed); "
                "a retry may deliver it twice where it was triggered",
                headers=error.headers,
            )
        self._refuse(request, error)

    # -- signing ---------------------------------------------------------

    def _authenticate(self, request: Request, app: App, body: bytes) -> dict[str, str]:
        """Check the request's signature; return its query parameters."""
        params: dict[str, str] = {}
        args: dict[bytes, list[bytes]] = request.args or {}  # Twisted declares `args = None`
        for raw_key, values in args.items():
            key = raw_key.decode("utf-8", "replace")
            if len(values) != 1 or key.lower() in params:
                raise bad_request("invalid_query", f"query parameter {key!r} is given more than once")
            params[key.lower()] = values[0].decode("utf-8", "replace")
        if params.get("auth_key") != app.key:
            raise api_unauthorized("auth_key is missing or is not this app's key")
        if params.get("auth_version", "1.0") != "1.0":
            raise bad_request("invalid_query", "auth_version must be 1.0")
        try:
            timestamp = int(params.get("auth_timestamp", ""))
        except ValueError:
            raise api_unauthorized("auth_timestamp must be the Unix time of the request") from None
        # In integers: a float minus an int of hundreds of digits overflows (a 500, not a 401).
        if abs(int(self.clock.seconds()) - timestamp) > TIMESTAMP_WINDOW:
            raise api_unauthorized(
                f"auth_timestamp is more than {TIMESTAMP_WINDOW} seconds from the server's time; check the clock"
            )
        if body or "body_md5" in params:
            if not hmac.compare_digest(params.get("body_md5", "").encode(), body_md5(body).encode()):
                raise api_unauthorized("body_md5 is missing or does not match the body")
        path = unquote(request.path.decode("latin-1"))
        expected = app.sign(api_string_to_sign(request.method.decode("ascii"), path, params))
        if not hmac.compare_digest(params.get("auth_signature", "").encode(), expected.encode()):
            raise api_unauthorized("invalid auth_signature: sign METHOD\\nPATH\\nsorted query with the app's secret")
        return params

    # -- routing ---------------------------------------------------------

    def _route(self, request: Request) -> Deferred[Any]:
        path = _path_of(request)
        if self.users_root:
            # /users/<id>/terminate_connections, as pusher-http-python 3.x
            # sends it: no app id in the path, the signed auth_key names the app.
            args: dict[bytes, list[bytes]] = request.args or {}  # Twisted declares `args = None`
            key = args.get(b"auth_key", [b""])[-1].decode("utf-8", "replace")
            app = self.apps.by_key(key)
            if app is None:
                raise api_unauthorized("auth_key is missing or names no app on this server")
            rest = ["users", *path]
        else:
            if not path:
                raise PushieError(404, "not_found", "use /apps/<app_id>/events (and the rest of the Pusher API)")
            # An unknown id is checked like a known one against a key and
            # secret nobody has: it gets the same 401 as a wrong key, so the
            # answers do not tell which app ids exist.
            app = self.apps.by_id(path[0]) or _unknown_app(path[0])
            rest = path[1:]
        assert request.content is not None
        body = request.content.read()
        params = self._authenticate(request, app, body)
        if not app.enabled:
            # Pusher's answer for a disabled app, told only to who holds its secret.
            raise PushieError(
                403,
                "app_disabled",
                f"app {app.id} is disabled on this server (enabled=false in the Pusher apps file)",
            )
        method = request.method
        if method == b"POST" and rest == ["events"]:
            self._rate_limit(app)
            return self._events(app, _json_body(body), batch=False)
        if method == b"POST" and rest == ["batch_events"]:
            self._rate_limit(app)
            return self._events(app, _json_body(body), batch=True)
        if method in (b"GET", b"HEAD") and rest == ["channels"]:
            return self._channels(app, params)
        if method in (b"GET", b"HEAD") and len(rest) == 2 and rest[0] == "channels":
            return self._channel(app, rest[1], params)
        if method in (b"GET", b"HEAD") and len(rest) == 3 and rest[0] == "channels" and rest[2] == "users":
            return self._users(app, rest[1])
        if method == b"POST" and len(rest) == 3 and rest[0] == "users" and rest[2] == "terminate_connections":
            return self._terminate(app, rest[1])
        raise PushieError(404, "not_found", f"no Pusher API endpoint {method.decode()} {'/'.join(rest)}")

    def _rate_limit(self, app: App) -> None:
        self.rate_limiter.check(b"pusher:" + app.key.encode())
        if self.hub.draining:
            raise PushieError(503, "shutting_down", "the server is shutting down; retry", {"Retry-After": "1"})

    # -- triggering ------------------------------------------------------

    def _events(self, app: App, body: Any, batch: bool) -> Deferred[Any]:
        if batch:
            if not isinstance(body, dict) or set(body) != {"batch"}:
                raise bad_request("invalid_body", 'a batch body is {"batch": [event, ...]}')
            events = body["batch"]
            if not isinstance(events, list) or not 1 <= len(events) <= MAX_BATCH:
                raise bad_request("invalid_batch", f'"batch" must hold 1 to {MAX_BATCH} events')
        else:
            events = [body]
        requests: list[PublishRequest] = []
        infos: list[tuple[list[str], set[str]]] = []
        for index, event in enumerate(events):
            where = f"event {index}" if batch else "body"
            channels, info, event_requests = self._event(app, event, where, batch)
            requests += event_requests
            infos.append((channels, info))
        d = self.hub.publish(requests)

        def answer(publications: Any) -> Deferred[Any]:
            self.metrics.publications.inc(len(publications))
            if not any(info for _, info in infos):
                return succeed({})
            wanted = [app.hub_name(c) for channels, info in infos if "subscription_count" in info for c in channels]
            counted = self.hub.subscription_counts(wanted) if wanted else succeed({})

            def infos_of(counts: dict[str, int]) -> Deferred[dict[str, Any]]:
                if batch:
                    # One info object per event, for its (single) channel.
                    return _gather(
                        [
                            self._info(app, channels[0], info, counts) if info else succeed({})
                            for channels, info in infos
                        ]
                    ).addCallback(lambda results: {"batch": results})
                channels, info = infos[0]
                return _gather([self._info(app, c, info, counts) for c in channels]).addCallback(
                    lambda results: {"channels": dict(zip(channels, results, strict=True))}
                )

            d = counted.addCallback(infos_of)
            # The events are published: a failed count read must not turn that into an error.
            return d.addErrback(lambda failure: {})

        return d.addCallback(answer)

    def _event(self, app: App, event: Any, where: str, batch: bool) -> tuple[list[str], set[str], list[PublishRequest]]:
        if not isinstance(event, dict):
            raise bad_request("invalid_body", f"{where}: an event must be a JSON object")
        unknown = set(event) - _EVENT_FIELDS
        if unknown:
            raise bad_request("unknown_field", f"{where}: unknown field {sorted(unknown)[0]!r}")
        name = event.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_EVENT_NAME:
            raise bad_request("invalid_event", f'{where}: "name" must be a string of 1 to {MAX_EVENT_NAME} characters')
        if name.startswith(("pusher:", "pusher_internal:")):
            raise bad_request("invalid_event", f"{where}: event names starting with pusher: are reserved")
        if "data" not in event:
            raise bad_request("missing_data", f'{where}: "data" is required')
        data = dumps(event["data"])
        size = len(event["data"].encode("utf-8")) if isinstance(event["data"], str) else len(data)
        if size > self.max_data_size:
            raise PushieError(
                413, "payload_too_large", f"{where}: data is over {self.max_data_size} bytes (pusher_max_data_size)"
            )
        if "channel" in event and "channels" in event:
            raise bad_request("invalid_body", f'{where}: give "channel" or "channels", not both')
        if "channels" in event and not batch:
            channels = event["channels"]
            if not isinstance(channels, list) or not 1 <= len(channels) <= MAX_CHANNELS:
                raise bad_request("invalid_channels", f'"channels" must list 1 to {MAX_CHANNELS} channels')
        elif "channel" in event:
            channels = [event["channel"]]
        else:
            raise bad_request(
                "missing_channel", f'{where}: "channel" is required' + ("" if batch else ' (or "channels")')
            )
        for channel in channels:
            if not is_valid_api_channel(channel):
                raise bad_request(
                    "invalid_channel", f"{where}: channel names are 1 to 164 of A-Z a-z 0-9 _ - = @ , . ;"
                )
        if len(set(channels)) != len(channels):
            raise bad_request("invalid_channels", f"{where}: a channel is named twice")
        socket_id = event.get("socket_id")
        if socket_id is not None and not is_valid_socket_id(socket_id):
            raise bad_request("invalid_socket_id", f'{where}: "socket_id" must look like 1234.5678')
        info = _info_attributes(event.get("info"), where)
        if "user_count" in info and not all(is_pusher_presence(c) for c in channels):
            raise bad_request("invalid_info", f"{where}: user_count is available for presence- channels only")
        requests = [PublishRequest(app.hub_name(c), data, name, meta=excluding(socket_id)) for c in channels]
        return channels, info, requests

    # -- reading ---------------------------------------------------------

    def _info(
        self, app: App, channel: str, info: set[str], counts: dict[str, int] | None = None
    ) -> Deferred[dict[str, Any]]:
        """
        The asked attributes of a channel.  C{subscription_count} is the
        cluster's (see L{pushie.hub.Hub.subscription_counts}), from C{counts}
        when the caller read them already.
        """
        hub_name = app.hub_name(channel)
        d: Deferred[dict[str, Any]] = succeed({})
        if "subscription_count" in info:
            read = succeed(counts) if counts is not None else self.hub.subscription_counts([hub_name])
            d = read.addCallback(lambda found: {"subscription_count": found.get(hub_name, 0)})
        if "user_count" in info:
            d.addCallback(
                lambda result: self.hub.members(hub_name).addCallback(
                    lambda members: {**result, "user_count": len(members)}
                )
            )
        return d

    def _channels(self, app: App, params: dict[str, str]) -> Deferred[Any]:
        prefix = params.get("filter_by_prefix", "")
        info = _info_attributes(params.get("info"), "info")
        if "user_count" in info and not prefix.startswith("presence-"):
            raise bad_request("invalid_info", "info=user_count needs filter_by_prefix=presence-")
        d = self.hub.channel_counts(app.hub_prefix + prefix)

        def listed(counts: dict[str, int]) -> Deferred[Any]:
            names = sorted(counts)
            channels = [app.channel_name(n) for n in names if app.owns(n) and is_pusher_channel(app.channel_name(n))]
            return _gather([self._info(app, c, info, counts) for c in channels]).addCallback(
                lambda results: {"channels": dict(zip(channels, results, strict=True))}
            )

        return d.addCallback(listed)

    def _channel(self, app: App, channel: str, params: dict[str, str]) -> Deferred[Any]:
        if not is_valid_api_channel(channel):
            raise bad_request("invalid_channel", "channel names are 1 to 164 of A-Z a-z 0-9 _ - = @ , . ;")
        info = _info_attributes(params.get("info"), "info")
        if "user_count" in info and not is_pusher_presence(channel):
            raise bad_request("invalid_info", "user_count is available for presence- channels only")
        hub_name = app.hub_name(channel)
        d = self.hub.subscription_counts([hub_name])

        def answer(counts: dict[str, int]) -> Deferred[Any]:
            occupied = counts.get(hub_name, 0) > 0
            return self._info(app, channel, info, counts).addCallback(lambda extra: {"occupied": occupied, **extra})

        return d.addCallback(answer)

    def _users(self, app: App, channel: str) -> Deferred[Any]:
        if not is_pusher_channel(channel) or not is_pusher_presence(channel):
            raise bad_request("not_presence_channel", "users are listed for presence- channels only")
        return self.hub.members(app.hub_name(channel)).addCallback(
            lambda members: {"users": [{"id": m.id} for m in members]}
        )

    def _terminate(self, app: App, user_id: str) -> Deferred[Any]:
        if not is_valid_user_id(user_id):
            raise bad_request("invalid_user_id", "a user id is 1 to 128 printable characters")
        self._rate_limit(app)
        request = PublishRequest(app.hub_name(USER_CHANNEL_PREFIX + user_id), b"null", TERMINATE_EVENT)
        return self.hub.publish([request]).addCallback(lambda _: {})


def _path_of(request: Request) -> list[str]:
    """The path below this resource, unquoted, without a trailing slash."""
    assert request.postpath is not None  # set by the Site before any render
    path = [unquote(p.decode("utf-8", "replace")) for p in request.postpath]
    if path and path[-1] == "":
        path.pop()
    return path


def _route_path(request: Request, users_root: bool) -> list[str]:
    """The path after C{/apps/<app_id>/}, or C{users/...} under the C{/users} root."""
    path = _path_of(request)
    return ["users", *path] if users_root else path[1:]


def _route_methods(rest: list[str]) -> tuple[bytes, ...]:
    """The methods the endpoint C{rest} (see L{_route_path}) takes; none for an unknown path."""
    if rest in (["events"], ["batch_events"]):
        return (b"POST",)
    if rest == ["channels"] or (len(rest) in (2, 3) and rest[0] == "channels" and rest[2:] in ([], ["users"])):
        return (b"GET",)
    if len(rest) == 3 and rest[0] == "users" and rest[2] == "terminate_connections":
        return (b"POST",)
    return ()


def _unknown_app(app_id: str) -> App:
    """A stand-in for an app id that is not configured: its key and secret match no request."""
    return App(app_id, "unknown-" + secrets.token_hex(32), secrets.token_hex(32))


def _json_body(body: bytes) -> Any:
    try:
        return loads(body)
    except InvalidJSON as e:
        raise bad_request("invalid_json", f"the body is not valid JSON: {e}") from None


def _info_attributes(value: Any, where: str) -> set[str]:
    if value is None or value == "":
        return set()
    if not isinstance(value, str):
        raise bad_request("invalid_info", f"{where}: info is a comma-separated string")
    attributes = {a.strip() for a in value.split(",") if a.strip()}
    unknown = attributes - _INFO_ATTRIBUTES
    if unknown:
        raise bad_request(
            "invalid_info", f"{where}: info may name user_count and subscription_count, not {sorted(unknown)[0]!r}"
        )
    return attributes


def _gather(ds: list[Deferred[Any]]) -> Deferred[list[Any]]:
    def results(outcomes: list[tuple[bool, Any]]) -> list[Any]:
        return [value for _, value in outcomes]

    def first_failure(failure: Failure) -> Failure:
        return failure.value.subFailure  # type: ignore[no-any-return]

    return DeferredList(ds, fireOnOneErrback=True, consumeErrors=True).addCallbacks(results, first_failure)
