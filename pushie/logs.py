# -*- test-case-name: tests.test_units -*-
"""
Logging helpers.

L{Throttle} keeps warnings about clients' bad input at a sane rate: the first
one of a kind is logged at once, the rest of that kind are counted and
summarised at most once per interval.  A flood of bad requests costs one log
line per interval, never one per request, and never a traceback.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class Throttle:
    """Rate-limited warnings, keyed by kind."""

    def __init__(self, log: Logger, clock: IReactorTime, interval: float = 10.0) -> None:
        self.log = log
        self.clock = clock
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, kind: str, format: str, **kwargs: Any) -> None:
        """
        Log C{format} as a warning unless one of the same C{kind} was logged
        less than C{interval} seconds ago; then it is only counted, and the
        count rides along with the next warning of that kind.
        """
        now = self.clock.seconds()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            format += " ({suppressed} more like this since the last report)"
            kwargs["suppressed"] = suppressed
        self.log.warn(format, kind=kind, **kwargs)


def json_observer() -> Any:
    """
    A log observer writing one JSON object per line to standard output, for
    log shippers and journald: C{twistd --logger pushie.logs.json_observer pushie}.

    Each line is Twisted's own event serialisation (C{log_format}, C{log_level},
    C{log_namespace}, C{log_time} and the event's fields), with no record
    separator other than the newline.
    """
    import sys

    from twisted.logger import jsonFileLogObserver

    return jsonFileLogObserver(sys.stdout, recordSeparator="")
