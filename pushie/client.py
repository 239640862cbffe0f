# -*- test-case-name: tests.test_cli -*-
"""
A synchronous Pushie client for programs that do not run Twisted: Django and
Flask apps, cron jobs, scripts.  Standard library only; importing it never
imports Twisted.

Publishing::

    from pushie.client import PushieClientError, publish

    answer = publish("bunno", {"text": "oh hai"})
    # {"channel": "bunno", "offset": 18, "epoch": "..."}

The daemon's address comes from C{url=} or the C{PUSHIE_URL} environment
variable (default C{http://127.0.0.1:8080}); the publisher key from C{key=} or
C{PUSHIE_PUBLISHER_KEY} (no key: publishing must be open on the daemon).

In a Django view, publish once the data the message talks about is committed,
so that a browser that reacts to the message finds it in the database::

    from django.conf import settings
    from django.db import transaction
    from pushie import client

    def post_comment(request):
        comment = Comment.objects.create(...)
        transaction.on_commit(
            lambda: client.publish(
                f"post-{comment.post_id}",
                {"id": comment.id, "text": comment.text},
                url=settings.PUSHIE_URL,
                key=settings.PUSHIE_PUBLISHER_KEY,
                idempotency_key=f"comment-{comment.id}",
                timeout=2.0,
            )
        )
        ...

In Flask, the same call in a view (with C{url=app.config["PUSHIE_URL"]}, ...).
Each call opens its own HTTP connection and blocks for at most about
C{timeout} seconds per network step (connecting, sending, each read), so keep
it short in a request handler, or hand the call to a task queue (Celery, RQ)
when a slow daemon must never slow a page down.  Calls are thread-safe.  To
publish many messages at once, L{publish_batch} sends them in one request.

Every failure raises L{PushieClientError} with C{status} (the HTTP status, or
C{None} when no answer came), C{code} (the daemon's error code, such as
C{"invalid_channel"}, C{"unauthorized"}, C{"payload_too_large"},
C{"engine_unavailable"}; or C{"unreachable"}, C{"timeout"},
C{"invalid_response"} when the daemon could not be reached or did not answer
like a Pushie daemon), C{message} and C{retry_after} (seconds, when the daemon
sent C{Retry-After}, as it does with 503).  A request that got an error
published nothing, except after C{"timeout"} or C{"unreachable"}, where the
message may or may not have been published: retry with the same
C{idempotency_key} to be sure it is published exactly once.

Following channels (Server-Sent Events, C{GET /events})::

    from pushie.client import listen

    for event in listen(["news", "sport"]):
        if event.type == "message":
            handle(event.data["channel"], event.data["data"])

L{listen} reconnects after drops with C{Last-Event-ID}, so no message is lost
or repeated while the daemon's history covers the gap; when it does not, the
C{subscribed} event says C{"recovered": false}.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from pushie import __version__

DEFAULT_URL = "http://127.0.0.1:8080"
USER_AGENT = f"pushie-client/{__version__}"

MAX_ANSWER_BYTES = 1024 * 1024
"""The largest answer body read from C{/publish}."""

MAX_LINE_BYTES = 16 * 1024 * 1024
"""The longest event stream line accepted (a message's envelope is one line)."""

_NOT_RETRIED = frozenset(range(400, 500)) - {408, 425, 429}
"""Statuses that a listener does not retry: the request itself is refused."""


class PushieClientError(Exception):
    """
    A publish or a subscription failed.

    @ivar status: the HTTP status of the daemon's answer, or C{None} when no
        answer came (network error, timeout).
    @ivar code: the daemon's error code (C{"invalid_channel"},
        C{"unauthorized"}, C{"payload_too_large"}, ...), or C{"unreachable"},
        C{"timeout"}, C{"invalid_response"}.
    @ivar message: what went wrong, in words.
    @ivar retry_after: seconds to wait before retrying, when the daemon said
        so with C{Retry-After}; else C{None}.
    """

    def __init__(self, status: int | None, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        prefix = f"{self.status} {self.code}" if self.status is not None else self.code
        return f"{prefix}: {self.message}"

    def __repr__(self) -> str:
        return f"PushieClientError({self.status!r}, {self.code!r}, {self.message!r})"


# -- publishing ---------------------------------------------------------------


def publish(
    channel: str,
    data: Any,
    *,
    url: str | None = None,
    key: str | None = None,
    event: str | None = None,
    idempotency_key: str | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """
    Publish one message and return the daemon's answer,
    C{{"channel": ..., "offset": ..., "epoch": ...}}.

    @param channel: the channel name.
    @param data: any value C{json.dumps} accepts (C{None} included); NaN and
        infinities are refused with C{ValueError}, other values that JSON
        cannot hold with C{TypeError}, before anything is sent.
    @param url: the daemon's base URL; default C{PUSHIE_URL} or
        C{http://127.0.0.1:8080}.  A URL that is not C{http://} or
        C{https://} raises C{ValueError}.
    @param key: the publisher key; default C{PUSHIE_PUBLISHER_KEY}, if set.
    @param event: the event name (the daemon's default is C{"message"}).
    @param idempotency_key: repeating it on the same channel within 5 minutes
        publishes nothing new and answers with the first offset, which makes
        retries safe.
    @param timeout: seconds allowed for connecting and for each read.
    @raise PushieClientError: the daemon refused, or could not be reached.
    """
    body: dict[str, Any] = {"channel": channel, "data": data}
    if event is not None:
        body["event"] = event
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    answer = _post_publish(body, url, key, timeout)
    if not isinstance(answer, dict) or not isinstance(answer.get("offset"), int):
        raise PushieClientError(200, "invalid_response", f"unexpected answer from the daemon: {answer!r:.200}")
    return answer


def publish_batch(
    publications: Iterable[Mapping[str, Any]],
    *,
    url: str | None = None,
    key: str | None = None,
    timeout: float = 10.0,
) -> list[dict[str, Any]]:
    """
    Publish 1 to 100 messages in one request, all or none, in order.

    Each publication is a mapping with C{"channel"} and C{"data"}, and
    optionally C{"event"} and C{"idempotency_key"}.  Returns one answer per
    publication, in order (C{{"channel", "offset", "epoch"}} each).  If the
    daemon refuses any publication, none is published and the error (its
    message names the publication's index) is raised.

    Other parameters and errors are those of L{publish}.
    """
    body = [dict(p) for p in publications]
    answer = _post_publish(body, url, key, timeout)
    results = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(results, list) or len(results) != len(body):
        raise PushieClientError(200, "invalid_response", f"unexpected answer from the daemon: {answer!r:.200}")
    return results


def base_url(url: str | None = None) -> str:
    """The daemon's base URL: C{url}, else C{PUSHIE_URL}, else the default; checked, without a trailing slash."""
    chosen = url or os.environ.get("PUSHIE_URL") or DEFAULT_URL
    parts = urllib.parse.urlsplit(chosen)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the Pushie URL must look like http://host:port, not {chosen!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"the Pushie URL must not have a query or fragment: {chosen!r}")
    return chosen.rstrip("/")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """
    Redirects are not followed: urllib would turn the POST into a GET and
    could send the publisher key to another host.  The 3xx becomes an error
    naming the new location.
    """

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


_opener = urllib.request.build_opener(_NoRedirects())


def _post_publish(body: Any, url: str | None, key: str | None, timeout: float) -> Any:
    base = base_url(url)
    if key is None:
        key = os.environ.get("PUSHIE_PUBLISHER_KEY") or None
    payload = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": USER_AGENT}
    if key:
        if any(c in key for c in "\r\n\0"):
            raise ValueError("the publisher key must be a single line")
        headers["Authorization"] = "Bearer " + key.strip()
    request = urllib.request.Request(base + "/publish", data=payload, headers=headers, method="POST")
    try:
        with _opener.open(request, timeout=timeout) as response:
            raw = response.read(MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as e:
        with e:
            raise _error_from_answer(e.code, e.headers, _read_quietly(e), base) from None
    except urllib.error.URLError as e:
        raise _network_error(e.reason, base) from None
    except (OSError, http.client.HTTPException) as e:
        raise _network_error(e, base) from None
    try:
        return json.loads(raw)
    except ValueError:
        raise PushieClientError(200, "invalid_response", f"{base} did not answer with JSON; is it a Pushie daemon?")


def _read_quietly(response: Any) -> bytes:
    try:
        return response.read(MAX_ANSWER_BYTES)
    except (OSError, http.client.HTTPException):
        return b""


def _error_from_answer(status: int, headers: Any, raw: bytes, base: str) -> PushieClientError:
    """The error for a non-2xx answer: the daemon's JSON error, or a description of what came instead."""
    retry_after = _retry_after(headers.get("Retry-After") if headers is not None else None)
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return PushieClientError(status, parsed["error"], str(parsed.get("message", "")), retry_after)
    if 300 <= status < 400:
        location = headers.get("Location") if headers is not None else None
        message = f"{base} answered {status} redirecting to {location}; use the final address as the URL"
    else:
        message = f"{base} answered {status} without a Pushie error; is the URL right, or is a proxy in the way?"
    return PushieClientError(status, "invalid_response", message, retry_after)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _network_error(reason: object, base: str) -> PushieClientError:
    if _is_timeout(reason):
        return PushieClientError(None, "timeout", f"{base} did not answer in time")
    if isinstance(reason, http.client.HTTPException) and not isinstance(reason, ConnectionError):
        return PushieClientError(None, "invalid_response", f"{base} did not answer like an HTTP server: {reason!r}")
    return PushieClientError(None, "unreachable", f"cannot reach {base}: {_reason(reason)}")


def _is_timeout(reason: object) -> bool:
    return isinstance(reason, TimeoutError) or "timed out" in str(reason)


def _reason(reason: object) -> str:
    return getattr(reason, "strerror", None) or str(reason) or type(reason).__name__


# -- following channels -------------------------------------------------------


@dataclass(frozen=True)
class StreamEvent:
    """
    One event of an event stream.

    @ivar type: C{"message"} for a published message, or C{"subscribed"},
        C{"join"}, C{"leave"}, C{"error"}.
    @ivar data: the event's JSON, parsed: for a message, the envelope
        C{{"type": "message", "channel", "event", "offset", "epoch", "data"}};
        for the others, the frame README.md describes (C{"subscribed"} carries
        C{"recovered"} after a resume).
    @ivar id: the stream's position once this event is handled: pass it as
        C{last_event_id} to a later L{listen} to resume from here.
    """

    type: str
    data: Any
    id: str | None


def listen(
    channels: str | Iterable[str],
    *,
    url: str | None = None,
    token: str | None = None,
    last_event_id: str | None = None,
    timeout: float = 10.0,
    read_timeout: float = 60.0,
    min_delay: float = 0.5,
    max_delay: float = 15.0,
    on_retry: Callable[[PushieClientError, float], None] | None = None,
) -> Generator[StreamEvent, None, None]:
    """
    Follow channels over Server-Sent Events, reconnecting after drops.

    A generator of L{StreamEvent}s, forever: stop iterating (or C{close()} it)
    to disconnect.  After a drop it waits (exponential backoff with jitter,
    C{min_delay} to C{max_delay} seconds, longer if the daemon sent
    C{Retry-After}) and reconnects with C{Last-Event-ID} set to the last
    event handled, so the daemon sends every message missed meanwhile, once,
    in order.  If it cannot, that channel's C{subscribed} event says
    C{"recovered": false}: reload your state from your app.

    @param channels: a channel name or several.
    @param token: a subscriber token (needed for C{private-*} and
        C{presence-*} channels).
    @param last_event_id: a L{StreamEvent.id} from an earlier run, to resume
        from there.
    @param timeout: seconds allowed for connecting and for the answer's headers.
    @param read_timeout: seconds of silence after which the connection is
        considered dead and is replaced; the daemon sends a keep-alive
        comment every C{sse_keepalive} (15) seconds.
    @param on_retry: called before each reconnection with the error (code
        C{"disconnected"} when the stream ended or broke, C{"timeout"} after
        C{read_timeout}, else as raised) and the delay in seconds.
    @raise PushieClientError: the first connection failed (not retried, so
        that a wrong URL or a daemon that is down shows at once), or any
        connection was refused with a 4xx status (bad channel name, missing,
        bad or expired token, channel not granted), or the daemon did not
        answer with an event stream.  Network errors, 5xx and 429 answers
        after the first connection are retried forever.
    """
    names = [channels] if isinstance(channels, str) else list(channels)
    if not names:
        raise ValueError("name at least one channel")
    base = base_url(url)
    query = [("channel", name) for name in names]
    if token:
        query.append(("token", token))
    target = urllib.parse.urlsplit(base + "/events?" + urllib.parse.urlencode(query))
    position = last_event_id or None
    failures = 0
    connected = False
    while True:
        error: PushieClientError
        try:
            connection, response = _open_stream(target, base, position, timeout, read_timeout)
        except PushieClientError as e:
            if not connected or e.status in _NOT_RETRIED or (e.status == 200 and e.code == "invalid_response"):
                raise
            error = e
        else:
            connected = True
            try:
                for event in _read_events(response, position):
                    position = event.id
                    failures = 0
                    yield event
                error = PushieClientError(None, "disconnected", f"{base} ended the event stream")
            except (OSError, http.client.HTTPException) as e:
                if _is_timeout(e):
                    error = PushieClientError(None, "timeout", f"{base} sent nothing for {read_timeout:g} s")
                else:
                    error = PushieClientError(None, "disconnected", f"lost the event stream from {base}: {_reason(e)}")
            finally:
                connection.close()
        delay = min(max_delay, min_delay * 2**failures)
        delay = random.uniform(min(min_delay, delay), delay) if failures else min_delay
        if error.retry_after is not None:
            delay = max(delay, min(error.retry_after, max_delay))
        failures = min(failures + 1, 32)
        if on_retry is not None:
            on_retry(error, delay)
        time.sleep(delay)


def _open_stream(
    target: urllib.parse.SplitResult, base: str, position: str | None, timeout: float, read_timeout: float
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    cls = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    connection = cls(target.hostname or "", target.port, timeout=timeout)
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache", "User-Agent": USER_AGENT}
    if position:
        headers["Last-Event-ID"] = position
    path = target.path + "?" + target.query
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        if response.status != 200:
            raise _error_from_answer(response.status, response.headers, _read_quietly(response), base)
        content_type = response.getheader("Content-Type", "")
        if not content_type.lower().startswith("text/event-stream"):
            raise PushieClientError(
                200, "invalid_response", f"{base}/events did not answer with an event stream; is it a Pushie daemon?"
            )
        if connection.sock is not None:
            connection.sock.settimeout(read_timeout)
    except PushieClientError:
        connection.close()
        raise
    except (OSError, http.client.HTTPException) as e:
        connection.close()
        raise _network_error(e, base) from None
    return connection, response


def _read_events(response: http.client.HTTPResponse, position: str | None) -> Iterator[StreamEvent]:
    """
    Parse an event stream (the WHATWG rules): C{data:} lines joined with
    newlines, C{event:} names, C{id:} remembered and committed when the event
    ends (a blank line), comments and unknown fields ignored.  An event cut
    short by a drop is not dispatched and its id not committed.
    """
    data: list[str] = []
    name = ""
    pending_id = position
    while True:
        raw = response.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES:
            raise http.client.HTTPException("an event stream line is too long")
        line = raw.decode("utf-8", "replace").rstrip("\n").rstrip("\r")
        if not line:
            position = pending_id
            if data:
                text = "\n".join(data)
                try:
                    parsed = json.loads(text)
                except ValueError:
                    raise PushieClientError(200, "invalid_response", f"an event's data is not JSON: {text:.200}")
                yield StreamEvent(name or "message", parsed, position)
            data = []
            name = ""
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
        elif field == "id" and "\0" not in value:
            pending_id = value
