# -*- test-case-name: tests.test_auth -*-
"""
The one place where requests are authorised.

L{Guard} answers: may this HTTP request publish (or read the server API), is
this subscriber token genuine, and may a connection holding it subscribe to
this channel.  Refusals are L{PushieError} values (401, 403) that the front
doors map to their answers.

Publisher keys are compared in constant time against every configured key.
Subscriber tokens are HS256 JWTs verified with PyJWT against every configured
secret; the algorithm is pinned, C{exp} and C{sub} are required, and the
times (C{exp}, C{nbf}, C{iat}) are checked against the reactor's clock (with a
small leeway) so that they can be tested and enforced on open connections.
A time claim must be a finite JSON number: PyJWT's JSON decoding accepts
C{NaN} and C{Infinity}, and a token that never expires is not one an app
meant to mint.  C{aud} follows PyJWT: with no audience configured a token
that names one is refused (it was minted for another service that may share
the secret); with audiences configured it must name one of them.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attr
import jwt
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from pushie.channels import is_guarded, is_presence, is_valid_channel
from pushie.errors import PushieError
from pushie.files import WatchedFile, read_secret_lines
from pushie.wire import InvalidJSON, loads

log = Logger()

ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32
MIN_PUBLISHER_KEY_LENGTH = 16
MAX_SUB_LENGTH = 256
CLOSE_TOKEN_EXPIRED = 4001
"""WebSocket close code for a connection whose token expired while it held guarded channels."""
MAX_NUMERIC_DATE = 253402300799
"""9999-12-31T23:59:59Z: the largest time claim accepted (larger ones are not dates a token means)."""


def split_list(value: str | Sequence[str] | None) -> list[str]:
    """A comma-separated environment value (or a TOML list) as a clean list."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item.strip()]


def check_publisher_keys(keys: Sequence[str], source: str) -> None:
    for key in keys:
        if len(key) < MIN_PUBLISHER_KEY_LENGTH:
            raise ValueError(f"{source}: a publisher key must be at least {MIN_PUBLISHER_KEY_LENGTH} characters")


def check_subscriber_secrets(secrets: Sequence[str], source: str) -> None:
    for secret in secrets:
        if len(secret.encode("utf-8")) < MIN_SECRET_BYTES:
            raise ValueError(f"{source}: a subscriber secret must be at least {MIN_SECRET_BYTES} bytes")


@attr.s(auto_attribs=True)
class ReloadableList:
    """
    Values from a fixed list plus a file that may change while the daemon
    runs (a L{WatchedFile}).  The file is looked at (one C{stat}) at most
    once per second, when the values are needed, and at once on L{reload}
    (C{SIGHUP}); a file that has become unreadable or invalid keeps the last
    good values and logs why.
    """

    fixed: list[str]
    path: str | None
    clock: IReactorTime
    validate: Callable[[Sequence[str], str], None]
    what: str
    _file: WatchedFile[list[str]] | None = attr.ib(default=None, init=False)
    _checked_at: float = attr.ib(default=-1.0, init=False)

    def __attrs_post_init__(self) -> None:
        if self.path:
            self._file = WatchedFile(self.path, self._parse, self.what)

    def _parse(self, lines: list[str], path: str) -> list[str]:
        self.validate(lines, path)
        return lines

    def reload(self) -> None:
        """Read the file again now, changed or not (C{SIGHUP})."""
        if self._file is not None:
            self._checked_at = self.clock.seconds()
            self._file.refresh(force=True)

    def values(self) -> list[str]:
        if self._file is None:
            return self.fixed
        now = self.clock.seconds()
        if now - self._checked_at >= 1.0:
            self._checked_at = now
            self._file.refresh()
        return self._file.value + self.fixed


@attr.s(frozen=True, auto_attribs=True)
class SubscriberToken:
    """A verified subscriber token: who it is for, until when, and what it grants."""

    sub: str
    exp: float
    channels: tuple[str, ...]
    info: Any = None

    def grants(self, channel: str) -> bool:
        """Whether this token grants C{channel}: an exact name, a C{prefix*}, or C{*}."""
        for pattern in self.channels:
            if pattern.endswith("*"):
                if channel.startswith(pattern[:-1]):
                    return True
            elif pattern == channel:
                return True
        return False


def _valid_grant(pattern: object) -> bool:
    if not isinstance(pattern, str):
        return False
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return is_valid_channel(pattern[:-1])
    return is_valid_channel(pattern)


def unauthorized(message: str, channel: str | None = None) -> PushieError:
    return PushieError(401, "unauthorized", message, channel=channel)


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    """A converter of attrs records: any iterable of strings, kept as an immutable tuple."""
    return tuple(values)


@attr.s(auto_attribs=True)
class Guard:
    """
    Authorisation policy for one daemon.

    @ivar publisher_keys: the accepted publisher keys; empty means publishing
        (and the server API) is open.
    @ivar subscriber_secrets: the secrets that may have signed a subscriber token.
    @ivar require_token: whether every channel needs a granting token, not only
        C{private-*} and C{presence-*}.
    @ivar leeway: seconds of clock skew allowed when checking C{exp}, C{nbf}
        and C{iat}.
    @ivar audience: the C{aud} values a token may name; empty: a token must
        name none.
    """

    clock: IReactorTime
    publisher_keys: ReloadableList | None = None
    subscriber_secrets: ReloadableList | None = None
    require_token: bool = False
    leeway: float = 5.0
    audience: tuple[str, ...] = attr.ib(default=(), converter=_strings)

    # -- publishers ------------------------------------------------------

    def reload(self) -> None:
        """Read the publisher keys and subscriber secrets files again now (C{SIGHUP})."""
        for values in (self.publisher_keys, self.subscriber_secrets):
            if values is not None:
                values.reload()

    @property
    def publishing_open(self) -> bool:
        """Whether anyone who reaches the port may publish."""
        return not (self.publisher_keys and self.publisher_keys.values())

    def check_publisher(self, authorization: bytes | None) -> None:
        """
        Allow or refuse a publisher by its C{Authorization: Bearer <key>} header.

        Every configured key is compared, in constant time, whatever matched.

        @raise PushieError: 401 with a C{WWW-Authenticate} header.
        """
        keys = self.publisher_keys.values() if self.publisher_keys else []
        if not keys:
            return
        challenge = {"WWW-Authenticate": 'Bearer realm="pushie"'}
        if not authorization:
            raise PushieError(401, "unauthorized", "send Authorization: Bearer <publisher key>", challenge)
        scheme, _, presented = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not presented.strip():
            raise PushieError(401, "unauthorized", "use Authorization: Bearer <publisher key>", challenge)
        presented = presented.strip()
        matched = False
        for key in keys:
            matched |= hmac.compare_digest(presented, key.encode("utf-8"))
        if not matched:
            challenge["WWW-Authenticate"] += ', error="invalid_token"'
            raise PushieError(401, "unauthorized", "the publisher key is not valid", challenge)

    # -- subscribers -----------------------------------------------------

    def verify_token(self, token: object, channel: str | None = None) -> SubscriberToken:
        """
        Verify a subscriber token and return its claims.

        @raise PushieError: 401 C{unauthorized} (or C{token_expired}) naming
            the fault without echoing the token.
        """
        if not isinstance(token, str) or not token or len(token) > 8192:
            raise unauthorized("the subscriber token must be a non-empty string", channel)
        secrets = self.subscriber_secrets.values() if self.subscriber_secrets else []
        if not secrets:
            raise unauthorized("this server has no subscriber secrets: tokens cannot be verified", channel)
        claims = None
        for secret in secrets:
            try:
                claims = jwt.decode(
                    token,
                    secret,
                    algorithms=[ALGORITHM],
                    # The times are checked below against the reactor's clock
                    # (PyJWT reads the wall clock, and lets NaN through).
                    options={
                        "require": ["exp", "sub"],
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                        "verify_aud": True,
                    },
                    audience=list(self.audience) or None,
                    leeway=self.leeway,
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.MissingRequiredClaimError as e:
                if e.claim == "aud":
                    raise unauthorized(_AUDIENCE_MISSING, channel) from None
                raise unauthorized(_NOT_A_TOKEN, channel) from None
            except jwt.InvalidAudienceError:
                raise unauthorized(
                    _AUDIENCE_WRONG if self.audience else _AUDIENCE_UNEXPECTED,
                    channel,
                ) from None
            except jwt.PyJWTError:
                raise unauthorized(_NOT_A_TOKEN, channel) from None
            except Exception:  # noqa: BLE001  PyJWT may raise others on hostile input
                raise unauthorized("the subscriber token could not be read", channel) from None
        if claims is None:
            raise unauthorized("the subscriber token's signature does not match any subscriber secret", channel)
        verified = self._claims(claims, channel)
        _strict_claims(token, channel)
        return verified

    def _claims(self, claims: dict[str, Any], channel: str | None) -> SubscriberToken:
        sub, grants = claims.get("sub"), claims.get("channels", [])
        if not isinstance(sub, str) or len(sub) > MAX_SUB_LENGTH:
            raise unauthorized(f"the token's 'sub' must be a string of at most {MAX_SUB_LENGTH} characters", channel)
        exp = _numeric_date(claims, "exp", channel)
        nbf = _numeric_date(claims, "nbf", channel)
        iat = _numeric_date(claims, "iat", channel)
        if not isinstance(grants, list) or not all(_valid_grant(g) for g in grants):
            raise unauthorized("the token's 'channels' must be a list of channel names or 'prefix*' patterns", channel)
        assert exp is not None  # required above
        token = SubscriberToken(sub=sub, exp=exp, channels=tuple(grants), info=claims.get("info"))
        now = self.clock.seconds()
        if self.expired(token):
            raise unauthorized("the subscriber token has expired; get a new one", channel)
        if nbf is not None and nbf > now + self.leeway:
            raise unauthorized("the subscriber token is not valid yet (nbf); check the clocks", channel)
        if iat is not None and iat > now + self.leeway:
            raise unauthorized("the subscriber token was issued in the future (iat); check the clocks", channel)
        return token

    def expired(self, token: SubscriberToken) -> bool:
        return self.clock.seconds() > token.exp + self.leeway

    def call_at_expiry(self, token: SubscriberToken, callback: Callable[[], None]) -> IDelayedCall:
        """
        Call C{callback} once C{token} has expired (its C{exp} plus the leeway,
        and a hair more, so that L{expired} is true by then): every door ends
        what only that token allowed in the same way.
        """
        delay = max(0.0, token.exp + self.leeway - self.clock.seconds()) + 0.01
        return self.clock.callLater(delay, callback)

    def needs_token(self, channel: str) -> bool:
        """Whether subscribing to C{channel} needs a granting token."""
        return self.require_token or is_guarded(channel)

    def check_subscribe(self, channel: str, token: SubscriberToken | None) -> None:
        """
        Allow or refuse a subscription to C{channel} by a connection holding
        C{token} (already verified, or C{None}).

        @raise PushieError: 401 C{unauthorized} when a needed token is missing
            or has expired, 403 C{forbidden} when it does not grant the channel.
        """
        if not self.needs_token(channel):
            return
        if token is None:
            what = "every channel" if self.require_token else "private-* and presence-* channels"
            raise unauthorized(f"{what} need a subscriber token that grants them", channel)
        if self.expired(token):
            raise unauthorized("the subscriber token has expired; get a new one", channel)
        if not token.grants(channel):
            raise PushieError(403, "forbidden", "the subscriber token does not grant this channel", channel=channel)

    def check_refresh(self, held: Iterable[str], old: SubscriberToken | None, new: SubscriberToken) -> list[str]:
        """
        Judge a token that replaces C{old} on a connection holding the
        channels C{held}, and return those of them it no longer grants (the
        caller drops them).

        A refresh may narrow what a connection reads, but it may not change
        who the connection is while it is a presence member: the member list
        is keyed by C{sub}, and a quiet switch would leave the old member in
        place while the connection speaks for the new one.

        @raise PushieError: 409 C{identity_changed} when C{new} names another
            C{sub} than C{old} while a C{presence-*} channel is held; the
            caller keeps the old token.
        """
        held = list(held)
        if old is not None and old.sub != new.sub and any(is_presence(name) for name in held):
            raise PushieError(
                409,
                "identity_changed",
                "a token for another 'sub' cannot replace this connection's token while it is a presence member; "
                "unsubscribe from the presence channels first, or reconnect",
            )
        return [name for name in held if self.needs_token(name) and not new.grants(name)]


def _numeric_date(claims: dict[str, Any], name: str, channel: str | None) -> float | None:
    """
    A time claim (RFC 7519 NumericDate) as a float, or C{None} when absent.

    Fractions are allowed, as the RFC allows them; C{NaN}, infinities,
    booleans, strings and dates outside 1970-9999 are refused.  The range is
    checked first: C{math.isfinite} converts to a float, which overflows on
    an integer of more than 308 digits (valid JSON).
    """
    if name not in claims:
        return None
    value = claims[name]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value <= MAX_NUMERIC_DATE
        or not math.isfinite(value)
    ):
        raise unauthorized(
            f"the token's '{name}' must be a number of seconds since the epoch (finite, 0 to {MAX_NUMERIC_DATE})",
            channel,
        )
    return float(value)


_NOT_A_TOKEN = f"the subscriber token is not a valid {ALGORITHM} JWT with 'sub' and 'exp'"
_AUDIENCE_MISSING = "the subscriber token has no 'aud'; this server accepts only tokens for its token_audience"
_AUDIENCE_WRONG = "the subscriber token's 'aud' names none of this server's token_audience values"
_AUDIENCE_UNEXPECTED = (
    "the subscriber token names an audience ('aud') but this server has no token_audience configured; "
    "set token_audience or mint the token without 'aud'"
)


@attr.s(frozen=True, auto_attribs=True)
class GuardSettings:
    """
    What the L{Guard} needs from the daemon's settings (built by C{pushie.tap};
    the files were already checked by the config).

    @ivar publisher_keys: the listed publisher keys (C{publisher_keys}).
    @ivar publisher_keys_file: a file of more, re-read when it changes.
    @ivar subscriber_secrets: the listed subscriber-token secrets (C{subscriber_secrets}).
    @ivar subscriber_secrets_file: a file of more, re-read when it changes.
    @ivar require_token: whether every channel needs a granting token.
    @ivar token_leeway: seconds of clock skew allowed on C{exp}, C{nbf}, C{iat}.
    @ivar token_audience: the C{aud} values a token may name.
    """

    publisher_keys: tuple[str, ...] = attr.ib(default=(), converter=_strings)
    publisher_keys_file: str | None = None
    subscriber_secrets: tuple[str, ...] = attr.ib(default=(), converter=_strings)
    subscriber_secrets_file: str | None = None
    require_token: bool = False
    token_leeway: float = 5.0
    token_audience: tuple[str, ...] = attr.ib(default=(), converter=_strings)


def guard_from_settings(settings: GuardSettings, clock: IReactorTime) -> Guard:
    """Build the daemon's L{Guard} from its settings."""
    keys = ReloadableList(
        list(settings.publisher_keys), settings.publisher_keys_file, clock, check_publisher_keys, "publisher keys"
    )
    secrets = ReloadableList(
        list(settings.subscriber_secrets),
        settings.subscriber_secrets_file,
        clock,
        check_subscriber_secrets,
        "subscriber secrets",
    )
    return Guard(
        clock=clock,
        publisher_keys=keys,
        subscriber_secrets=secrets,
        require_token=settings.require_token,
        leeway=settings.token_leeway,
        audience=settings.token_audience,
    )


def first_secret(secrets: Sequence[str], secrets_file: str | None) -> str | None:
    """The secret that signs tokens: the first line of C{secrets_file}, else the first of C{secrets}."""
    from_file = read_secret_lines(secrets_file) if secrets_file else []
    listed = from_file + list(secrets)
    return listed[0] if listed else None


def mint_token(secret: str, sub: str, channels: Sequence[str], ttl: float, now: float, info: Any = None) -> str:
    """Sign a subscriber token, as an app would (used by C{pushie token} and the tests)."""
    claims: dict[str, Any] = {"sub": sub, "channels": list(channels), "iat": int(now), "exp": int(now + ttl)}
    if info is not None:
        claims["info"] = info
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def _strict_claims(token: str, channel: str | None) -> None:
    """
    Read a verified token's claims again with Pushie's strict JSON decoder.

    PyJWT decodes claims with Python's C{json}, which takes C{NaN},
    C{Infinity} and lone surrogates; an C{info} claim holding one would
    otherwise reach presence frames as JSON no client can parse.
    """
    segment = token.split(".")[1]
    try:
        loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (InvalidJSON, binascii.Error, ValueError) as e:
        raise unauthorized(f"the subscriber token's claims are not valid JSON (RFC 8259): {e}", channel) from None
