# -*- test-case-name: tests.test_auth,tests.test_pusher_apps -*-
"""
Files the daemon re-reads while it runs: the publisher keys, the subscriber
secrets (L{pushie.auth.ReloadableList}) and the Pusher apps
(L{pushie.doors.pusher.apps.AppsFile}).

One rule for all of them (L{WatchedFile}): a file is looked at with one
C{stat}; when its modification time, size or inode changed (or when asked to,
on C{SIGHUP}) it is read and parsed again; a file that has become unreadable
or invalid keeps the last good value and logs why, so that an operator's typo
never takes the daemon down.  At start-up the same problems stop the daemon
instead, with the same message.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.logger import Logger

log = Logger()

T = TypeVar("T")
_MISSING = (-1, -1, -1)
"""The stamp of a file that could not be found."""


def read_secret_lines(path: str) -> list[str]:
    """The non-empty, non-comment lines of a keys, secrets or apps file."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


class WatchedFile(Generic[T]):
    """
    The parsed content of a file of lines, re-read when it changes.

    @ivar value: the last good parse.
    """

    def __init__(self, path: str, parse: Callable[[list[str], str], T], what: str) -> None:
        """
        @param parse: turns the file's lines into the value, or raises
            C{ValueError} naming what is wrong (it gets the path to name it).
        @param what: what the file holds, for log lines ("publisher keys").
        @raise ValueError: the file cannot be read or parsed now.
        """
        self.path = path
        self.parse = parse
        self.what = what
        self._stamp: tuple[int, int, int] | None = None
        self.value: T = self._read(initial=True)  # type: ignore[assignment]  # initial reads raise instead of None

    def _read(self, initial: bool = False, force: bool = False) -> T | None:
        try:
            info = os.stat(self.path)
        except OSError as e:
            self._failed(initial, e.strerror or str(e), _MISSING)
            return None
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        if stamp == self._stamp and not force:
            return None
        try:
            value = self.parse(read_secret_lines(self.path), self.path)
        except OSError as e:
            self._failed(initial, e.strerror or str(e), stamp)
            return None
        except ValueError as e:
            self._failed(initial, str(e), stamp)
            return None
        self._stamp = stamp
        return value

    def _failed(self, initial: bool, error: str, stamp: tuple[int, int, int]) -> None:
        if initial:
            raise ValueError(f"cannot use {self.what} file {self.path}: {error}")
        log.error(
            "Keeping the previous {what}: cannot reload {path}: {error}",
            what=self.what,
            path=self.path,
            error=error,
        )
        # Said once: the file is looked at again only when it changes again.
        self._stamp = stamp

    def refresh(self, force: bool = False) -> bool:
        """
        Re-read the file if it changed (or, with C{force}, in any case).

        @return: whether L{value} is a new one.
        """
        value = self._read(force=force)
        if value is None:
            return False
        self.value = value
        log.info("Reloaded {what} from {path}", what=self.what, path=self.path)
        return True
