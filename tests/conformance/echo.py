"""
The test-only echo mode the conformance suite is served from.

Pushie is not an echo server: its doors answer JSON frames with JSON frames,
greet with a welcome frame and refuse binary messages.  Autobahn|Testsuite
judges a server by what it echoes.  L{serve_echo} swaps a running door's
protocol class for a subclass that (1) sends no greeting and (2) echoes each
complete message, text or binary, as it was received.  Everything below the
message handler is the door's own: its Autobahn options (sizes, UTF-8
validation, masking, close timeout, no compression), its slow-consumer guard,
its close handling, its write path.

It lives under tests/ only: there is no setting, flag, environment variable
or path that turns it on in a daemon.
"""

from __future__ import annotations

from typing import Any


def serve_echo(factory: Any) -> None:
    """Make C{factory}'s new connections echo (the factory of a door in a running test daemon)."""
    door = factory.protocol

    class EchoProtocol(door):  # type: ignore[misc, valid-type]
        _greeting = False

        def onOpen(self) -> None:
            # The door's own onOpen (bookkeeping, write guard, memory
            # savings) with its greeting frame held back.
            self._greeting = True
            try:
                super().onOpen()
            finally:
                self._greeting = False

        def sendMessage(self, payload: bytes, isBinary: bool = False, *args: Any, **kwargs: Any) -> None:
            if not self._greeting:
                super().sendMessage(payload, isBinary, *args, **kwargs)

        def send_prepared(self, payload: bytes, frame: bytes) -> None:
            if not self._greeting:
                super().send_prepared(payload, frame)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.sendMessage(payload, isBinary)

    EchoProtocol.__name__ = door.__name__ + "Echo"
    factory.protocol = EchoProtocol
