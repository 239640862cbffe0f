# -*- test-case-name: tests.test_publish -*-
"""
The HTTP API: C{POST /publish}, and the mapping of L{PushieError} to JSON
answers, done here and only here.

A publish body is parsed and validated whole before anything reaches the Hub,
so a request that gets an error publishes nothing.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pushie.channels import MAX_OFFSET, check_channel, is_valid_channel, parse_offset
from pushie.doors.context import Door, DoorContext
from pushie.errors import ENGINE_FAILURES, EngineUnavailable, PartiallyPublished, PushieError, bad_request
from pushie.limits import RateLimiter, address_of
from pushie.metrics import Metrics
from pushie.records import Publication, PublishRequest
from pushie.wire import InvalidJSON, dumps, is_plain, json_string, loads

MAX_BATCH = 100
MAX_EVENT_LENGTH = 128
MAX_IDEMPOTENCY_KEY_LENGTH = 256

log = Logger()


def write_json(request: Request, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    """Answer C{request} with a JSON body and finish it, unless the client has gone."""
    if getattr(request, "_disconnected", False) or request.finished:
        return
    answer_json = getattr(request, "answer_json", None)
    if answer_json is not None and not headers:
        # The HTTP short path's request writes the same bytes in one piece.
        answer_json(status, body)
        return
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    # A known length: no chunked encoding (fewer bytes, no last-chunk write).
    request.setHeader(b"content-length", b"%d" % len(body))
    for name, value in (headers or {}).items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    request.write(body)
    request.finish()


def write_error(request: Request, error: PushieError) -> None:
    """The one mapping of a L{PushieError} to an HTTP answer."""
    write_json(request, error.status, error.to_json(), error.headers)


def refuse(door: Door, request: Request, error: PushieError, what: str, metric_prefix: str = "") -> None:
    """
    The one way an HTTP door refuses a client's request: counted in
    C{pushie_rejected_requests_total}, logged at most once per 10 s per kind
    (C{what} is a fixed phrase such as C{"a publish"}, never client input), and
    answered with the error's status and JSON body.
    """
    door.metrics.reject(metric_prefix + error.code)
    door.throttle.warn(
        f"{what}:{error.code}",
        "Refused " + what + " from {peer}: {status} {code}",
        peer=request.getClientAddress(),
        status=error.status,
        code=error.code,
    )
    write_error(request, error)


def error_of(
    failure: Failure, logger: Logger, what: str, metrics: Metrics | None = None, message: str | None = None
) -> PushieError:
    """
    The one mapping of an HTTP door's failed Deferred to the error it answers
    with: the L{PushieError} it carries, or, for anything else (a bug, logged
    with its traceback as C{what} under C{logger}), a 503
    C{engine_unavailable} (with C{message} when given).  With C{metrics},
    errors the engine caused are counted in C{pushie_engine_errors_total}.
    """
    if isinstance(failure.value, PushieError):
        error = failure.value
    else:
        logger.failure(what, failure)
        error = EngineUnavailable() if message is None else EngineUnavailable(message)
    if metrics is not None and error.code in ENGINE_FAILURES:
        metrics.engine_errors.inc()
    return error


class ErrorResource(Resource):
    isLeaf = True

    def __init__(self, error: PushieError) -> None:
        super().__init__()
        self.error = error

    def render(self, request: Request) -> int:
        write_error(request, self.error)
        return NOT_DONE_YET


# -- parsing ----------------------------------------------------------------

_SINGLE_FIELDS = frozenset({"channel", "channels", "data", "event", "idempotency_key"})


def _fold_keys(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """Lower-case the field names of a publication; refuse ambiguous or unknown ones."""
    if obj.keys() <= _SINGLE_FIELDS:
        return obj  # the usual case: known names, already in lower case
    folded: dict[str, Any] = {}
    for key, value in obj.items():
        lower = key.lower()
        if lower in folded:
            raise bad_request("invalid_body", f"{where}: field {lower!r} is given twice (field names ignore case)")
        if lower not in _SINGLE_FIELDS:
            raise bad_request(
                "unknown_field",
                f"{where}: unknown field {key!r}; use channel or channels, data, event, idempotency_key",
            )
        folded[lower] = value
    return folded


def _options(fields: dict[str, Any], where: str) -> tuple[str, str | None]:
    event = fields.get("event", "message")
    if not isinstance(event, str) or not 1 <= len(event) <= MAX_EVENT_LENGTH:
        raise bad_request("invalid_event", f'{where}: "event" must be a string of 1 to {MAX_EVENT_LENGTH} characters')
    key = fields.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH):
        raise bad_request(
            "invalid_idempotency_key",
            f'{where}: "idempotency_key" must be a string of 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters',
        )
    return event, key


def _data(fields: dict[str, Any], where: str) -> bytes:
    if "data" not in fields:
        raise bad_request("missing_data", f'{where}: "data" is required (null is allowed)')
    return dumps(fields["data"])


def _plain_request(fields: object) -> PublishRequest | None:
    """
    The publication of the usual shape, an object of a valid C{channel} and
    C{data} and nothing else, checked in one step; C{None} for any other
    (the general checks then take it, with their precise errors).  It gives
    what the general checks give for the same object.
    """
    if type(fields) is dict and len(fields) == 2 and "data" in fields:
        channel = fields.get("channel")
        if type(channel) is str and is_valid_channel(channel):
            return PublishRequest(channel, dumps(fields["data"]), "message", None)
    return None


def parse_publish_body(body: bytes) -> tuple[list[PublishRequest], bool]:
    """
    Parse and validate a C{/publish} body.

    @return: the publications, in order, and whether the answer is a single
        object (the body named one C{channel}) rather than C{{"results": [...]}}.
    @raise PushieError: 400 with a code and a message naming the fault.
    """
    return publish_requests(decode_body(body))


def decode_body(body: bytes) -> Any:
    """The decoded JSON of a C{/publish} body; 400 C{invalid_json} if it is not JSON."""
    try:
        return loads(body)
    except InvalidJSON as e:
        raise bad_request("invalid_json", f"the body is not valid JSON: {e}") from None


def plain_batch(parsed: Any) -> list[tuple[str, bytes]] | None:
    """
    A decoded batch whose every item has the usual shape (L{_plain_request}:
    a valid C{channel} and C{data}, nothing else), as C{(channel, data)} in
    order, checked in one loop with no L{PublishRequest} per item; C{None}
    for anything else (L{publish_requests} then takes it, with its errors).
    """
    if type(parsed) is not list or not 1 <= len(parsed) <= MAX_BATCH:
        return None
    items: list[tuple[str, bytes]] = []
    append = items.append
    for fields in parsed:
        if type(fields) is not dict or len(fields) != 2 or "data" not in fields:
            return None
        channel = fields.get("channel")
        if type(channel) is not str or not is_valid_channel(channel):
            return None
        append((channel, dumps(fields["data"])))
    return items


def publish_requests(parsed: Any) -> tuple[list[PublishRequest], bool]:
    """L{parse_publish_body} of a body already decoded (L{decode_body})."""
    if isinstance(parsed, dict):
        plain = _plain_request(parsed)
        if plain is not None:
            return [plain], True
        fields = _fold_keys(parsed, "body")
        event, key = _options(fields, "body")
        if "channel" in fields and "channels" in fields:
            raise bad_request("invalid_body", 'give either "channel" or "channels", not both')
        if "channel" in fields:
            channel = check_channel(fields["channel"])
            return [PublishRequest(channel, _data(fields, "body"), event, key)], True
        if "channels" in fields:
            names = fields["channels"]
            if not isinstance(names, list) or not 1 <= len(names) <= MAX_BATCH:
                raise bad_request("invalid_channels", f'"channels" must be a list of 1 to {MAX_BATCH} channel names')
            checked = [check_channel(n) for n in names]
            if len(set(checked)) != len(checked):
                raise bad_request("invalid_channels", '"channels" names a channel more than once')
            data = _data(fields, "body")
            return [PublishRequest(c, data, event, key) for c in checked], False
        raise bad_request("missing_channel", 'the body needs a "channel" (or a "channels" list)')
    if isinstance(parsed, list):
        if not 1 <= len(parsed) <= MAX_BATCH:
            raise bad_request("invalid_batch", f"a batch holds 1 to {MAX_BATCH} publications")
        requests = []
        for index, item in enumerate(parsed):
            plain = _plain_request(item)
            if plain is not None:
                requests.append(plain)
                continue
            where = f"publication {index}"
            if not isinstance(item, dict):
                raise bad_request("invalid_batch", f"{where}: each item of a batch must be an object")
            fields = _fold_keys(item, where)
            if "channels" in fields:
                raise bad_request("invalid_batch", f'{where}: batch items take one "channel" each')
            if "channel" not in fields:
                raise bad_request("missing_channel", f'{where}: "channel" is required')
            channel = check_channel(fields["channel"])
            event, key = _options(fields, where)
            requests.append(PublishRequest(channel, _data(fields, where), event, key))
        return requests, False
    raise bad_request("invalid_body", "the body must be a JSON object or an array of objects")


def is_json_content_type(value: bytes | None) -> bool:
    """Whether a C{Content-Type} header value says JSON (C{application/json}, any parameters)."""
    if value is None:
        return False
    known = _content_types.get(value)
    if known is None:
        known = _is_json_content_type(value)
        if len(_content_types) < 64:  # what clients send: a handful of spellings
            _content_types[value] = known
    return known


_content_types: dict[bytes, bool] = {}


def _is_json_content_type(value: bytes) -> bool:
    media_type, _, params = value.decode("latin-1").partition(";")
    if media_type.strip().lower() != "application/json":
        return False
    for param in params.split(";"):
        name, _, charset = param.partition("=")
        if name.strip().lower() == "charset" and charset.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


def read_publish_body(request: Request, draining: bool) -> tuple[list[PublishRequest], bool]:
    """
    The publications of a publish request (C{POST /publish} or the admin
    dashboard's test publication), once its door has checked who sends it:
    L{checked_publish_body}, then L{parse_publish_body}.

    @raise PushieError: as said.
    """
    return parse_publish_body(checked_publish_body(request, draining))


def checked_publish_body(request: Request, draining: bool) -> bytes:
    """
    The body of a publish request, not parsed yet: 503 C{shutting_down}
    while C{draining}, 415 unless the body says it is JSON.

    @raise PushieError: as said.
    """
    if draining:
        raise PushieError(
            503, "shutting_down", "the server is shutting down; retry on another node", {"Retry-After": "1"}
        )
    if not is_json_content_type(request.getHeader(b"content-type")):
        raise PushieError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    assert request.content is not None
    return request.content.read()


def publish_answer(publications: list[Publication], single: bool) -> bytes:
    """The body of a publish's 200: one result for a single publish, else C{{"results": [...]}}."""
    if single:
        return result_json(publications[0])
    return results_json(publications)


def result_of(publication: Publication) -> dict[str, Any]:
    return {"channel": publication.channel, "offset": publication.offset, "epoch": publication.epoch}


def result_json(publication: Publication) -> bytes:
    """C{dumps(result_of(publication))}, built directly."""
    return b'{"channel":%s,"offset":%d,"epoch":%s}' % (
        json_string(publication.channel),
        publication.offset,
        json_string(publication.epoch),
    )


_PLAIN_RESULT = '{"channel":"%s","offset":%d,"epoch":"%s"}'


def results_json(publications: list[Publication]) -> bytes:
    """
    C{{"results": [...]}} of L{result_json}s: when every channel name and
    epoch is plain text (L{is_plain}: valid channel names and the memory
    engine's epochs are), formatted as text and encoded once.
    """
    if is_plain("".join([p.channel for p in publications]) + "".join([p.epoch for p in publications])):
        results = ",".join([_PLAIN_RESULT % (p.channel, p.offset, p.epoch) for p in publications])
        return ('{"results":[' + results + "]}").encode("ascii")
    return b'{"results":[' + b",".join([result_json(p) for p in publications]) + b"]}"


# -- resources --------------------------------------------------------------


class JSONResource(Resource):
    """A leaf that answers unsupported methods with a JSON 405 and an C{Allow} header."""

    isLeaf = True
    allowed_methods: tuple[bytes, ...] = ()

    def render(self, request: Request) -> Any:
        method = request.method
        if method not in self.allowed_methods and not (method == b"HEAD" and b"GET" in self.allowed_methods):
            allow = ", ".join(m.decode() for m in self.allowed_methods)
            write_error(
                request,
                PushieError(405, "method_not_allowed", f"use {allow} on this path", headers={"Allow": allow}),
            )
            return NOT_DONE_YET
        return super().render(request)


class PublishResource(JSONResource, Door):
    """C{POST /publish}: validate, authorise, publish, answer with offsets."""

    allowed_methods = (b"POST",)

    def __init__(self, context: DoorContext, rate_limiter: RateLimiter | None = None) -> None:
        super().__init__()
        self.take(context)
        self.rate_limiter = rate_limiter

    def render_POST(self, request: Request) -> int:
        started = self.clock.seconds()
        try:
            parsed = decode_body(self._validate(request))
            items = plain_batch(parsed)
            if items is not None:
                # The usual batch: in one pass on an engine that takes it so.
                publications = self.hub.publish_plain(items)
                if publications is not None:
                    self._answer(request, publications, False, started)
                    return NOT_DONE_YET
                requests, single = [PublishRequest(c, data, "message", None) for c, data in items], False
            else:
                requests, single = publish_requests(parsed)
        except PushieError as e:
            refuse(self, request, e, "a publish")
            return NOT_DONE_YET
        publications = self.hub.publish_now(requests)
        if publications is not None:
            # The engine answered at once (memory): no Deferred to wait on.
            self._answer(request, publications, single, started)
            return NOT_DONE_YET
        d = self.hub.publish(requests)
        d.addCallbacks(
            lambda publications: self._answer(request, publications, single, started),
            lambda failure: self._failed(request, failure),
        )
        return NOT_DONE_YET

    def _validate(self, request: Request) -> bytes:
        """The checks before the body is read (authorisation, rate, draining, content type): the body."""
        authorization = request.getHeader(b"authorization")
        self.guard.check_publisher(authorization)
        if self.rate_limiter is not None and self.rate_limiter.rate > 0:  # 0: no limit, no key needed
            key = authorization if not self.guard.publishing_open and authorization else None
            self.rate_limiter.check(key or b"address:" + address_of(request.getClientAddress()).encode())
        return checked_publish_body(request, self.hub.draining)

    def _answer(self, request: Request, publications: list[Publication], single: bool, started: float) -> None:
        write_json(request, 200, publish_answer(publications, single))
        metrics = self.metrics
        metrics.publications.inc(len(publications))
        metrics.publish_seconds.observe(self.clock.seconds() - started)

    def _failed(self, request: Request, failure: Failure) -> None:
        error = error_of(failure, log, "Publishing failed", self.metrics)
        if isinstance(error, PartiallyPublished) and error.results is not None:
            self.metrics.publications.inc(sum(1 for r in error.results if "offset" in r))
        self.metrics.reject(error.code)
        write_error(request, error)


def _query_int(request: Request, name: str, minimum: int) -> int | None:
    args: dict[bytes, list[bytes]] = request.args or {}  # Twisted declares `args = None`
    values = args.get(name.encode())
    if not values:
        return None
    number = parse_offset(values[-1])
    if number is None or number < minimum:
        raise bad_request(
            "invalid_query", f"{name!r} must be a whole number from {minimum} to {MAX_OFFSET} in ASCII digits"
        )
    return number


class ChannelsResource(JSONResource, Door):
    """
    The server API under C{/channels}, read-only, behind the publisher key:

      - C{GET /channels}: the occupied channels and their subscriber counts
      - C{GET /channels/<name>}: subscribers, offset and epoch
      - C{GET /channels/<name>/history?since=&limit=}: kept messages, oldest first
      - C{GET /channels/<name>/presence}: the members of a C{presence-*} channel
    """

    allowed_methods = (b"GET",)

    def __init__(self, context: DoorContext) -> None:
        super().__init__()
        self.take(context)

    def render_GET(self, request: Request) -> int:
        assert request.postpath is not None  # set by the Site before any render
        try:
            self.guard.check_publisher(request.getHeader(b"authorization"))
            d = self._answer(request, [segment.decode("utf-8", "replace") for segment in request.postpath])
        except PushieError as e:
            write_error(request, e)
            return NOT_DONE_YET
        d.addCallback(lambda body: write_json(request, 200, body))
        d.addErrback(lambda failure: self._failed(request, failure))
        return NOT_DONE_YET

    def _answer(self, request: Request, path: list[str]) -> Any:
        if path in ([], [""]):
            # The cluster's channels and counts (with Redis, every live node's).
            return self.hub.channel_counts("").addCallback(
                lambda counts: dumps(
                    {
                        "channels": [
                            {"name": name, "subscribers": count}
                            for name, count in sorted(counts.items())
                            if is_valid_channel(name)  # not another Pusher app's, nor a Pusher user's
                        ]
                    }
                )
            )
        name = check_channel(path[0])
        rest = [p for p in path[1:] if p]
        if not rest:
            return self.hub.state(name).addCallback(
                lambda state: self.hub.subscription_counts([name]).addCallback(
                    lambda counts: dumps(
                        {
                            "name": name,
                            "subscribers": counts.get(name, 0),
                            "offset": state.offset,
                            "epoch": state.epoch,
                        }
                    )
                )
            )
        if rest == ["history"]:
            since = _query_int(request, "since", 0) or 0
            limit = _query_int(request, "limit", 1)
            return self.hub.history(name, since, limit).addCallback(
                lambda history: b"".join(
                    (
                        b'{"channel":',
                        dumps(name),
                        b',"epoch":',
                        dumps(history.state.epoch),
                        b',"offset":%d,"complete":%s,"messages":['
                        % (history.state.offset, b"true" if history.complete else b"false"),
                        b",".join(p.envelope for p in history.publications),
                        b"]}",
                    )
                )
            )
        if rest == ["presence"]:
            if not name.startswith("presence-"):
                raise bad_request("not_presence_channel", "members are kept for presence-* channels only")
            return self.hub.members(name).addCallback(
                lambda members: dumps({"channel": name, "members": [m.to_json() for m in members]})
            )
        raise PushieError(
            404, "not_found", "use /channels/<name>, /channels/<name>/history or /channels/<name>/presence"
        )

    def _failed(self, request: Request, failure: Failure) -> None:
        write_error(
            request,
            error_of(failure, log, "Server API request failed", message="the engine did not answer; retry later"),
        )


class HealthResource(JSONResource, Door):
    """
    C{GET /healthz}: 200 while the engine accepts publishes, 503 when it does
    not or while draining.  With Redis shards, 200 C{degraded} while some
    shards are up and others are not: their channels keep working on this
    daemon, and every daemon shares the same shards, so taking it out of a
    load balancer would help nobody.
    """

    allowed_methods = (b"GET",)

    def __init__(self, context: DoorContext) -> None:
        super().__init__()
        self.take(context)

    def render_GET(self, request: Request) -> int:
        engine_ok = self.hub.healthy()
        shards = self.hub.shards_health()
        if self.hub.draining:
            status = "draining"
        elif engine_ok:
            status = "ok"
        elif shards is not None and any(shards.values()):
            # Channels of the shards that are up work: keep this daemon in its load balancer.
            status = "degraded"
        else:
            status = "engine_unavailable"
        body: dict[str, Any] = {
            "status": status,
            "engine": self.hub.engine_name,
            "connections": len(self.hub.connections),
            "channels": len(self.hub.channel_names()),
        }
        if shards is not None:
            body["shards"] = {name: "ok" if up else "unavailable" for name, up in shards.items()}
        write_json(request, 200 if status in ("ok", "degraded") else 503, dumps(body))
        return NOT_DONE_YET
