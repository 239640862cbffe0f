# -*- test-case-name: tests.test_publish -*-
"""
Errors as values: each has a stable code, a message a user can act on and the
HTTP status it maps to.  Front doors raise them; L{pushie.doors.api} turns them into
JSON answers and L{pushie.doors.websocket} into C{error} frames, in one place each.
"""

from __future__ import annotations

import json
from typing import Any


class PushieError(Exception):
    """
    A refusal of a client's request.

    @ivar code: a short machine-readable code, such as C{"invalid_channel"}.
    @ivar message: what went wrong and what to do about it.
    @ivar status: the HTTP status this maps to.
    @ivar headers: extra HTTP headers for the answer (C{Allow}, C{Retry-After}).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        channel: str | None = None,
        results: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.channel = channel
        self.results = results

    def to_json(self) -> bytes:
        """The JSON body of an HTTP error answer (with C{results}, one per publication, when set)."""
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.results is not None:
            body["results"] = self.results
        return json.dumps(body).encode()

    def to_frame(self) -> dict[str, Any]:
        """The WebSocket C{error} frame for this refusal."""
        frame: dict[str, Any] = {
            "type": "error",
            "code": self.code,
            "message": self.message,
        }
        if self.channel is not None:
            frame["channel"] = self.channel
        return frame

    def __repr__(self) -> str:
        return f"PushieError({self.status}, {self.code!r}, {self.message!r})"


def bad_request(code: str, message: str, channel: str | None = None) -> PushieError:
    return PushieError(400, code, message, channel=channel)


class EngineUnavailable(PushieError):
    """The engine could not promise storage and delivery; nothing was published."""

    def __init__(self, message: str = "the engine is unavailable; nothing was published, retry later") -> None:
        super().__init__(503, "engine_unavailable", message, headers={"Retry-After": "1"})


class OutcomeUnknown(PushieError):
    """
    The engine was asked to publish but its answer was lost (the connection
    dropped, or no answer came in time) and asking again with the same
    publish id did not settle it in time either: the message may or may not
    have been published.  Unlike L{EngineUnavailable}, this does not promise
    that nothing was published, so it has a code of its own.
    """

    def __init__(
        self,
        message: str = (
            "the message may or may not have been published (the engine's answer was lost); "
            "retry with the same idempotency_key to publish it exactly once"
        ),
    ) -> None:
        super().__init__(503, "outcome_unknown", message, headers={"Retry-After": "1"})


class PartiallyPublished(PushieError):
    """
    A request whose publications went to several engines (the shards of
    L{pushie.engines.sharded.ShardedEngine}) was published by some and not by
    others.  C{results} says, per publication and in order, either where it
    was published (C{channel}, C{offset}, C{epoch}) or why not (C{channel},
    C{error}: C{engine_unavailable}, certainly not published, or
    C{outcome_unknown}, maybe).
    """

    def __init__(self, results: list[dict[str, Any]]) -> None:
        super().__init__(
            503,
            "partially_published",
            "some publications were published and some were not (their Redis shard failed); "
            "see results, and retry the failed ones (with the same idempotency_key for outcome_unknown)",
            headers={"Retry-After": "1"},
            results=results,
        )


ENGINE_FAILURES = frozenset({"engine_unavailable", "outcome_unknown", "partially_published"})
"""The codes of a 503 that the engine caused (counted in C{pushie_engine_errors_total})."""
