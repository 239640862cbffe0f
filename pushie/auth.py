# -*- test-case-name: tests.test_auth -*-
"""
The one place where requests are authorised.

L{Guard} answers two questions: may this HTTP request publish (or read the
server API), and may this connection subscribe to this channel.  Refusals are
L{PushieError} values (401, 403) that the front doors map to their answers.
"""

from __future__ import annotations

import attr

from pushie.channels import is_guarded
from pushie.errors import PushieError


@attr.s(auto_attribs=True)
class Guard:
    """
    Authorisation policy.

    This version has no publisher keys and no subscriber secrets: publishing
    is open, public channels are open, and C{private-*} / C{presence-*}
    channels are refused because no token can grant them.
    """

    @property
    def publishing_open(self) -> bool:
        """Whether anyone who reaches the port may publish."""
        return True

    def check_publisher(self, authorization: bytes | None) -> None:
        """Allow or refuse a publisher by its C{Authorization} header."""

    def check_subscribe(self, channel: str, token: str | None) -> None:
        """
        Allow or refuse a subscription to C{channel} by a connection holding
        C{token}.

        @raise PushieError: 401 C{unauthorized} when a token is needed.
        """
        if is_guarded(channel):
            raise PushieError(
                401,
                "unauthorized",
                "private-* and presence-* channels need a subscriber token that grants them",
                channel=channel,
            )
