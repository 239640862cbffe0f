# -*- test-case-name: tests.test_pusher_units -*-
"""
Pusher apps and signatures.

An app is C{id:key:secret}, with options after it on the same line:
C{enabled=false}, C{max_connections=N}, C{client_event_rate=N},
C{webhook_url=https://...} (Pusher-format webhooks, see
L{pushie.doors.pusher.hooks}), C{subscription_count=true} (L{parse_apps}).  Its channels live in the Hub under their own
names for the first app (shared with the native doors) and under
C{<id>|<name>} for the others, so two apps never see each other's messages.

Every signature is HMAC-SHA256 with the app's secret, compared in constant
time:

  - private channel:  C{<socket_id>:<channel>}
  - presence channel: C{<socket_id>:<channel>:<channel_data>}
  - user sign-in:     C{<socket_id>::user::<user_data>}
  - HTTP API:         C{METHOD\\nPATH\\nsorted query}, see L{api_string_to_sign}
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attr

from pushie.channels import APP_SEPARATOR
from pushie.files import WatchedFile
from pushie.webhooks import check_url

MAX_CHANNEL_LENGTH = 164
_CHANNEL_RE = re.compile(r"[A-Za-z0-9_\-=@,.;]{1,%d}\Z" % MAX_CHANNEL_LENGTH)  # noqa: UP031
_APP_FIELD_RE = re.compile(r"[A-Za-z0-9_\-.]{1,128}\Z")
_SOCKET_ID_RE = re.compile(r"[0-9]{1,20}\.[0-9]{1,20}\Z")  # ASCII digits only (\d also takes other scripts' digits)
USER_CHANNEL_PREFIX = "#server-to-user-"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class App:
    """One Pusher app; C{primary} for the first, whose channels the native doors share."""

    id: str
    key: str
    secret: str = attr.ib(repr=False)
    primary: bool = False
    enabled: bool = True
    max_connections: int = 0
    """Open Pusher connections of this app on this daemon; 0: no limit of its own."""
    client_event_rate: float | None = None
    """Client events per second per connection; None: the daemon's C{pusher_client_event_rate}."""
    webhook_url: str | None = None
    """Where this app's Pusher-format webhooks go (signed with its secret); None: none."""
    subscription_count: bool = False
    """Whether subscribers get C{pusher_internal:subscription_count} (and the webhook C{subscription_count} events)."""

    def hub_name(self, channel: str) -> str:
        """The Hub's name for this app's C{channel}."""
        return channel if self.primary else self.id + APP_SEPARATOR + channel

    def channel_name(self, hub_name: str) -> str:
        """This app's name for a Hub channel of its space."""
        return hub_name if self.primary else hub_name[len(self.id) + 1 :]

    @property
    def hub_prefix(self) -> str:
        """What every Hub name of this app's channels starts with."""
        return "" if self.primary else self.id + APP_SEPARATOR

    def owns(self, hub_name: str) -> bool:
        """Whether a Hub channel belongs to this app's space."""
        if self.primary:
            return APP_SEPARATOR not in hub_name
        return hub_name.startswith(self.hub_prefix)

    def sign(self, text: str) -> str:
        """
        Hex HMAC-SHA256 of C{text} with the app's secret.  A lone surrogate
        (JSON allows C{"\\ud800"}) is signed as its bytes, not refused with
        an exception: no client can have signed it, so its check just fails.
        """
        data = text.encode("utf-8", "surrogatepass")
        return hmac.new(self.secret.encode("utf-8"), data, hashlib.sha256).hexdigest()

    def check_auth(self, auth: object, text: str) -> bool:
        """Whether C{auth} is C{"<key>:<signature of text>"}, in constant time."""
        if not isinstance(auth, str):
            return False
        key, _, signature = auth.partition(":")
        expected = self.sign(text)
        # Both comparisons always run: no early exit on a wrong key.
        key_ok = hmac.compare_digest(key.encode("utf-8", "surrogatepass"), self.key.encode("utf-8"))
        signature_ok = hmac.compare_digest(signature.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))
        return key_ok and signature_ok


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
APP_OPTIONS = ("enabled", "max_connections", "client_event_rate", "webhook_url", "subscription_count")


def _app_options(options: list[str], where: str) -> dict[str, Any]:
    """The C{name=value} options after an app's C{id:key:secret}."""
    values: dict[str, Any] = {}
    for option in options:
        name, equals, value = option.partition("=")
        if not equals or name not in APP_OPTIONS:
            raise ValueError(
                f"{where}: unknown option {option[:40]!r}: an app is id:key:secret followed by any of "
                "enabled=true|false max_connections=N client_event_rate=N webhook_url=https://... "
                "subscription_count=true|false"
            )
        if name in values:
            raise ValueError(f"{where}: {name} is given twice")
        if name in ("enabled", "subscription_count"):
            if value.lower() not in _TRUE | _FALSE:
                raise ValueError(f"{where}: {name} must be true or false, not {value[:20]!r}")
            values[name] = value.lower() in _TRUE
        elif name == "webhook_url":
            try:
                values[name] = check_url(value)
            except ValueError as e:
                raise ValueError(f"{where}: webhook_url: {e}") from None
        elif name == "max_connections":
            if not value.isdigit() or len(value) > 9:
                raise ValueError(f"{where}: max_connections must be a whole number (0: no limit of its own)")
            values[name] = int(value)
        else:
            try:
                rate = float(value)
            except ValueError:
                rate = -1.0
            if not 0 <= rate < 1e6:  # also refuses nan and inf
                raise ValueError(f"{where}: client_event_rate must be a number of events per second (0: none)")
            values[name] = rate
    return values


def parse_apps(items: Iterable[str], where: str) -> list[App]:
    """
    Read C{id:key:secret [option=value ...]} entries; the first becomes the
    primary app.

    @raise ValueError: naming the entry and the rule it breaks.
    """
    apps: list[App] = []
    for number, item in enumerate(items, 1):
        tokens = item.split()
        parts = tokens[0].split(":") if tokens else []
        if len(parts) != 3 or not all(parts):
            raise ValueError(
                f"{where}: entry {number} must be id:key:secret (no spaces), then options if any, "
                "e.g. 1234:app-key:app-secret enabled=true max_connections=1000 client_event_rate=10"
            )
        app_id, key, secret = parts
        for name, value in (("id", app_id), ("key", key)):
            if not _APP_FIELD_RE.match(value):
                raise ValueError(f"{where}: entry {number}: the app {name} may hold only A-Z a-z 0-9 _ - .")
        if len(secret) < 16:
            raise ValueError(f"{where}: entry {number}: the secret must be at least 16 characters")
        if any(a.id == app_id for a in apps) or any(a.key == key for a in apps):
            raise ValueError(f"{where}: entry {number}: app ids and keys must be unique")
        options = _app_options(tokens[1:], f"{where}: entry {number} (app {app_id})")
        apps.append(App(app_id, key, secret, primary=not apps, **options))
    return apps


class AppsFile:
    """
    The apps of C{pusher_apps_file} (a L{WatchedFile}) followed by the fixed
    C{pusher_apps}: the first of them all is the primary app.
    """

    def __init__(self, path: str, fixed: Sequence[str]) -> None:
        self.fixed = list(fixed)
        self.file = WatchedFile(path, self._parse, "Pusher apps")

    def _parse(self, lines: list[str], path: str) -> list[App]:
        return parse_apps(lines + self.fixed, path)

    @property
    def apps(self) -> list[App]:
        return self.file.value

    def refresh(self, force: bool = False) -> bool:
        """Whether the file changed into a valid new list of apps (see L{WatchedFile.refresh})."""
        return self.file.refresh(force)


class Apps:
    """The configured apps, found by key (WebSocket) or by id (HTTP API)."""

    def __init__(self, apps: Sequence[App]) -> None:
        self.replace(apps)

    def replace(self, apps: Sequence[App]) -> None:
        """Take a new list of apps (a reload): every holder of this object sees them."""
        self.all = list(apps)
        self._by_key = {a.key: a for a in apps}
        self._by_id = {a.id: a for a in apps}

    def __bool__(self) -> bool:
        return bool(self.all)

    def by_key(self, key: str) -> App | None:
        return self._by_key.get(key)

    def by_id(self, app_id: str) -> App | None:
        return self._by_id.get(app_id)

    def owner(self, hub_name: str) -> App | None:
        """The app whose space holds a Hub channel."""
        app_id, separator, _ = hub_name.partition(APP_SEPARATOR)
        if separator:
            return self._by_id.get(app_id)
        return self.all[0] if self.all else None


def is_pusher_channel(name: object) -> bool:
    """A channel a client may subscribe to: 1 to 164 of A-Z a-z 0-9 _ - = @ , . ;"""
    return isinstance(name, str) and _CHANNEL_RE.match(name) is not None


def is_valid_api_channel(name: object) -> bool:
    """A channel the HTTP API may trigger on: a client channel or C{#server-to-user-<id>}."""
    if isinstance(name, str) and name.startswith(USER_CHANNEL_PREFIX):
        user = name[len(USER_CHANNEL_PREFIX) :]
        return 0 < len(user) <= MAX_CHANNEL_LENGTH and is_valid_user_id(user)
    return is_pusher_channel(name)


def is_valid_user_id(user_id: str) -> bool:
    return 0 < len(user_id) <= 128 and user_id.isprintable()


def is_valid_socket_id(value: object) -> bool:
    return isinstance(value, str) and _SOCKET_ID_RE.match(value) is not None


def is_pusher_private(channel: str) -> bool:
    """C{private-*} (including C{private-encrypted-*}): needs a channel auth signature."""
    return channel.startswith("private-")


def is_encrypted(channel: str) -> bool:
    return channel.startswith("private-encrypted-")


def is_pusher_presence(channel: str) -> bool:
    return channel.startswith("presence-")


def is_cache(channel: str) -> bool:
    """Cache channels send the last event to a new subscriber (or C{pusher:cache_miss})."""
    for prefix in ("cache-", "private-cache-", "private-encrypted-cache-", "presence-cache-"):
        if channel.startswith(prefix):
            return True
    return False


def channel_auth_string(socket_id: str, channel: str, channel_data: str | None = None) -> str:
    """What a private or presence channel's C{auth} signs."""
    if channel_data is None:
        return f"{socket_id}:{channel}"
    return f"{socket_id}:{channel}:{channel_data}"


def signin_string(socket_id: str, user_data: str) -> str:
    """What a C{pusher:signin}'s C{auth} signs."""
    return f"{socket_id}::user::{user_data}"


def api_string_to_sign(method: str, path: str, params: Mapping[str, str]) -> str:
    """
    The HTTP API's string to sign: method, path and every query parameter but
    C{auth_signature}, keys lower-cased and sorted, values as sent (unescaped).
    """
    query = "&".join(
        f"{key}={value}" for key, value in sorted((k.lower(), v) for k, v in params.items() if k != "auth_signature")
    )
    return f"{method.upper()}\n{path}\n{query}"


def body_md5(body: bytes) -> str:
    return hashlib.md5(body, usedforsecurity=False).hexdigest()
