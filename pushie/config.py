# -*- test-case-name: tests.test_config -*-
"""
Settings: the one place where Pushie reads its configuration.

Each setting has a name (C{max_message_size}), a command-line option
(C{--max-message-size}), an environment variable (C{PUSHIE_MAX_MESSAGE_SIZE}),
a TOML key (C{max_message_size}) and a default.  Precedence, lowest first:
defaults, the TOML file given by C{--config} (or C{PUSHIE_CONFIG}), C{PUSHIE_*}
variables, the command line.  An unknown key or a bad value raises
L{ConfigError} naming it, so a daemon never starts half-configured.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import attr


class ConfigError(ValueError):
    """A setting is unknown or has a value that cannot be used."""


def _positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    number = int(value)
    if number <= 0:
        raise ValueError("must be greater than 0")
    return number


def _count(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    number = int(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


_BYTE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}


def _bytes(value: Any) -> int:
    """A size in bytes: a whole number, or one with a binary unit (C{16MiB}, C{512M}, C{2GiB})."""
    if isinstance(value, bool):
        raise ValueError("expected a number of bytes such as 536870912 or 512MiB")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits) :]
        if not digits.isdigit() or len(digits) > 18 or unit not in _BYTE_UNITS:
            raise ValueError("expected a number of bytes such as 536870912 or 512MiB")
        number = int(digits) * _BYTE_UNITS[unit]
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number of seconds")
    number = float(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _webhook_url(value: Any) -> str | None:
    if value is None or value == "":
        return None
    from pushie.webhooks import check_url

    return check_url(value)


def _secret_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


MIN_ADMIN_TOKEN_LENGTH = 16


def _admin_token(value: Any) -> str | None:
    token = _secret_text(value)
    if token is not None and len(token) < MIN_ADMIN_TOKEN_LENGTH:
        raise ValueError(f"must be at least {MIN_ADMIN_TOKEN_LENGTH} characters (e.g. openssl rand -hex 32)")
    return token


def _admin_chart_seconds(value: Any) -> int:
    number = _positive_int(value)
    if number > 3600:
        raise ValueError("must be at most 3600 (an hour of samples)")
    return number


def _webhook_retry(value: Any) -> float:
    number = _seconds(value)
    if number >= 300:
        raise ValueError("must be under 300 seconds: receivers refuse bodies older than 5 minutes")
    return number


def _rate(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number per second")
    number = float(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _optional_endpoint(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("expected a Twisted endpoint string such as tcp:9100:interface=127.0.0.1")
    return value


def _positive_seconds(value: Any) -> float:
    number = _seconds(value)
    if number == 0:
        raise ValueError("must be greater than 0")
    return number


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _endpoints(value: Any) -> list[str]:
    if isinstance(value, str):
        items = value.split()
    elif isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        raise ValueError("expected an endpoint string or a list of them")
    if not items:
        raise ValueError("at least one endpoint is needed")
    return items


def _words(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError("expected a string or a list of strings")


def _path(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("expected a file path")
    return value


def _publisher_keys(value: Any) -> list[str]:
    from pushie.auth import check_publisher_keys, split_list

    keys = split_list(value)
    check_publisher_keys(keys, "publisher_keys")
    return keys


def _subscriber_secrets(value: Any) -> list[str]:
    from pushie.auth import check_subscriber_secrets, split_list

    secrets = split_list(value)
    check_subscriber_secrets(secrets, "subscriber_secrets")
    return secrets


def _pusher_apps(value: Any) -> list[str]:
    from pushie.auth import split_list
    from pushie.doors.pusher.apps import parse_apps

    items = split_list(value)
    parse_apps(items, "pusher_apps")
    return items


def _engine(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = ",".join(value)  # TOML: engine = ["redis://a:6379/0", "redis://b:6379/0"]
    if value == "memory":
        return value
    if isinstance(value, str) and value.startswith(REDIS_SCHEMES):
        if "," in value and not value.startswith(("redis+sentinel://", "rediss+sentinel://")):
            from pushie.engines.sharded import split_shard_urls

            return ",".join(split_shard_urls(value))
        from pushie.engines.redis import parse_redis_url

        parse_redis_url(value)
        return value
    raise ValueError(
        "expected 'memory', a redis:// URL such as redis://127.0.0.1:6379/0, "
        "several separated by commas (Redis shards), "
        "or redis+sentinel://host:26379,host:26379/service/0 with Redis Sentinel"
    )


REDIS_SCHEMES = ("redis://", "rediss://", "redis+sentinel://", "rediss+sentinel://")


@attr.s(frozen=True, auto_attribs=True)
class Setting:
    """How one setting is named, parsed and documented."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    metavar: str = "VALUE"
    flag: bool = False
    repeatable: bool = False
    cli: bool = True
    """False for secrets: they come from files or the environment, never from argv."""

    @property
    def option(self) -> str:
        return self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "PUSHIE_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "listen",
        _endpoints,
        ["tcp:8080:interface=127.0.0.1"],
        "Twisted endpoint to serve on (repeatable; environment: space-separated).",
        metavar="ENDPOINT",
        repeatable=True,
    ),
    Setting(
        "listen_backlog",
        _positive_int,
        511,
        "Connections the kernel queues before the daemon accepts them, for tcp, tcp6, ssl, unix and reuseport "
        "(also under haproxy:) endpoints that give no backlog= of their own "
        "(Twisted's default, 50, drops SYNs in reconnect waves).",
        metavar="N",
    ),
    Setting(
        "gc_threshold",
        _count,
        50_000,
        "Allocations between two young-generation garbage collections (Python's default is 700); "
        "the startup heap is also frozen out of collections. Fewer collections promote fewer "
        "in-flight objects, so the full collections that pause the daemon come less often. "
        "0: Python's own settings.",
        metavar="N",
    ),
    Setting(
        "engine",
        _engine,
        "memory",
        "Engine: 'memory' (one process), redis://[:password@]host:port/db (many daemons), several "
        "redis:// URLs separated by commas to shard channels over them (README: 'Several Redis servers'), or "
        "redis+sentinel://[:password@]host:port[,host:port...]/service/db (Redis Sentinel; rediss+ for TLS).",
        metavar="ENGINE",
    ),
    Setting(
        "redis_timeout",
        _positive_seconds,
        2.0,
        "Seconds to wait for a Redis answer; a publish whose answer was lost is asked again as long (then 503).",
        metavar="SECONDS",
    ),
    Setting(
        "redis_sentinel_password",
        _secret_text,
        None,
        "Password of the sentinels (their requirepass) with a redis+sentinel:// engine (environment or TOML only).",
        cli=False,
    ),
    Setting(
        "redis_wait_replicas",
        _count,
        0,
        "Replicas that must have each publish before it answers 200 (Redis WAIT, for up to redis_timeout/2;"
        " else it is asked again, then 503 outcome_unknown). 0: answer once the primary has it.",
        metavar="N",
    ),
    Setting(
        "history_size",
        _count,
        100,
        "Messages kept per channel for recovery and the history API (0: none).",
        metavar="N",
    ),
    Setting(
        "history_ttl",
        _positive_seconds,
        300.0,
        "Seconds a message is kept in its channel's history.",
        metavar="SECONDS",
    ),
    Setting(
        "memory_budget",
        _bytes,
        512 << 20,
        "Memory engine: bytes all channels' history may hold (e.g. 512MiB); past it the oldest "
        "publications are evicted first; 0: no limit.",
        metavar="BYTES",
    ),
    Setting(
        "idempotency_max_keys",
        _count,
        100_000,
        "Memory engine: idempotency keys remembered at most (the oldest are forgotten first); 0: no limit.",
        metavar="N",
    ),
    Setting(
        "max_message_size",
        _positive_int,
        65536,
        "Largest /publish body and largest client WebSocket frame, in bytes.",
        metavar="BYTES",
    ),
    Setting(
        "ping_interval",
        _seconds,
        25.0,
        "Seconds of silence before the server pings a WebSocket client (0: never).",
        metavar="SECONDS",
    ),
    Setting(
        "ping_timeout",
        _seconds,
        20.0,
        "Seconds to wait for a pong before dropping the connection.",
        metavar="SECONDS",
    ),
    Setting(
        "handshake_timeout",
        _seconds,
        10.0,
        "Seconds a client has for a whole HTTP request or WebSocket handshake (line, headers and body), "
        "from accept or from the previous answer on a kept-alive connection; 408 past it.",
        metavar="SECONDS",
    ),
    Setting(
        "publish_rate",
        _rate,
        1000.0,
        "Publish requests per second allowed per publisher key (per address when publishing is open); 0: no limit.",
        metavar="PER_SECOND",
    ),
    Setting(
        "max_connections",
        _count,
        10000,
        "Open WebSocket and SSE connections this daemon accepts, HTTP connections still sending a request "
        "included (503 past it); 0: no limit.",
        metavar="N",
    ),
    Setting(
        "max_connections_per_ip",
        _count,
        1000,
        "Open connections accepted from one client address, those still sending a request included "
        "(429 past it); 0: no limit.",
        metavar="N",
    ),
    Setting(
        "max_subscriptions",
        _count,
        100,
        "Channels one connection or event stream may follow; 0: no limit.",
        metavar="N",
    ),
    Setting(
        "presence_max_members",
        _count,
        100,
        "Distinct members a presence channel admits; a new one past it is refused (presence_full); 0: no limit.",
        metavar="N",
    ),
    Setting(
        "slow_consumer_buffer",
        _count,
        1 << 20,
        "Bytes that may wait for a client that does not read before it is dropped with 1013; 0: no limit.",
        metavar="BYTES",
    ),
    Setting(
        "slow_consumer_grace",
        _seconds,
        10.0,
        "Seconds a client may leave its buffer full before it is dropped with 1013; 0: no limit.",
        metavar="SECONDS",
    ),
    Setting(
        "webhook_url",
        _webhook_url,
        None,
        "POST channel_occupied/vacated and member_added/removed events here (needs PUSHIE_WEBHOOK_SECRET).",
        metavar="URL",
    ),
    Setting(
        "webhook_secret",
        _secret_text,
        None,
        "Secret that signs webhook bodies (X-Pushie-Signature: hex HMAC-SHA256).",
        cli=False,
    ),
    Setting(
        "webhook_debounce",
        _seconds,
        3.0,
        "Seconds a vacated/removed event waits, dropped with its pair if the channel or member is back.",
        metavar="SECONDS",
    ),
    Setting(
        "webhook_retry_for",
        _webhook_retry,
        60.0,
        "Seconds a webhook delivery is retried (5xx, 429, timeouts) before it is given up (under 300).",
        metavar="SECONDS",
    ),
    Setting(
        "webhook_timeout",
        _positive_seconds,
        10.0,
        "Seconds to wait for the webhook receiver's answer.",
        metavar="SECONDS",
    ),
    Setting(
        "webhook_max_queue",
        _positive_int,
        10000,
        "Webhook events that may wait for delivery; past it occupancy events are dropped (oldest first) "
        "before member events, counted in pushie_webhook_events_dropped_total. With Redis, also about "
        "the most undelivered events the cluster's stream keeps (oldest trimmed first).",
        metavar="N",
    ),
    Setting(
        "metrics_listen",
        _optional_endpoint,
        None,
        "Serve /metrics on this endpoint instead of the main ones.",
        metavar="ENDPOINT",
    ),
    Setting(
        "sse_keepalive",
        _seconds,
        15.0,
        "Seconds between keep-alive comments on an idle event stream (0: none).",
        metavar="SECONDS",
    ),
    Setting(
        "shutdown_timeout",
        _seconds,
        5.0,
        "Seconds to wait for clients to close on shutdown before dropping them.",
        metavar="SECONDS",
    ),
)

SETTINGS = SETTINGS + (
    Setting(
        "publisher_keys_file",
        _path,
        None,
        "File of publisher keys, one a line; re-read when it changes.",
        metavar="PATH",
    ),
    Setting(
        "publisher_keys",
        _publisher_keys,
        [],
        "Publisher keys, comma-separated (environment or TOML only).",
        cli=False,
    ),
    Setting(
        "subscriber_secrets_file",
        _path,
        None,
        "File of subscriber token secrets (32+ bytes), one a line; all verify, the first signs.",
        metavar="PATH",
    ),
    Setting(
        "subscriber_secrets",
        _subscriber_secrets,
        [],
        "Subscriber token secrets, comma-separated (environment or TOML only).",
        cli=False,
    ),
    Setting(
        "require_token",
        _flag,
        False,
        "Every channel needs a granting subscriber token; Pusher clients get no public channels of the first app.",
        flag=True,
    ),
    Setting(
        "token_leeway",
        _seconds,
        5.0,
        "Seconds of clock skew allowed when checking a token's exp, nbf and iat.",
        metavar="SECONDS",
    ),
    Setting(
        "token_audience",
        _words,
        [],
        "A subscriber token's aud must name one of these (repeatable); none set: tokens with an aud are refused.",
        metavar="AUDIENCE",
        repeatable=True,
    ),
    Setting(
        "allowed_origin",
        _words,
        [],
        "Origin a WebSocket page may come from, with its port (repeatable; default: any).",
        metavar="ORIGIN",
        repeatable=True,
    ),
)

SETTINGS = SETTINGS + (
    Setting(
        "pusher_apps_file",
        _path,
        None,
        "File of Pusher apps, a line each: id:key:secret, then options enabled= max_connections= client_event_rate=; "
        "the first shares the native channels; re-read on change and SIGHUP. None: no Pusher door.",
        metavar="PATH",
    ),
    Setting(
        "pusher_apps",
        _pusher_apps,
        [],
        "Pusher apps, id:key:secret (and options, as in the file) comma-separated (environment or TOML only).",
        cli=False,
    ),
    Setting(
        "pusher_activity_timeout",
        _positive_seconds,
        120.0,
        "Seconds of silence before the server pings a Pusher client (sent to clients as activity_timeout).",
        metavar="SECONDS",
    ),
    Setting(
        "pusher_pong_timeout",
        _positive_seconds,
        30.0,
        "Seconds a pinged Pusher client has to answer before it is closed with 4201.",
        metavar="SECONDS",
    ),
    Setting(
        "pusher_client_event_rate",
        _rate,
        10.0,
        "Client events a Pusher connection may send per second (error 4301 past it; 0: client events off); "
        "an app's client_event_rate overrides it.",
        metavar="N",
    ),
    Setting(
        "pusher_subscription_count_interval",
        _positive_seconds,
        5.0,
        "Seconds between two pusher_internal:subscription_count events of one channel (and subscription_count "
        "webhooks), for apps with subscription_count=true: the first change is sent at once, later ones together.",
        metavar="SECONDS",
    ),
    Setting(
        "pusher_max_data_size",
        _positive_int,
        10240,
        "Largest data of a Pusher event (HTTP API trigger or client event), in bytes.",
        metavar="BYTES",
    ),
)

SETTINGS = SETTINGS + (
    Setting(
        "admin_token",
        _admin_token,
        None,
        "Secret (16+ characters) that opens the /admin dashboard and its API (Authorization: Bearer); "
        "none: /admin answers 403 admin_disabled.",
        cli=False,
    ),
    Setting(
        "admin_max_streams",
        _positive_int,
        4,
        "Live /admin/stream connections open at once (429 too_many_admin_streams past it).",
        metavar="N",
    ),
    Setting(
        "admin_top_channels",
        _positive_int,
        20,
        "Channels the dashboard lists each second: the busiest by messages/s, then by subscribers.",
        metavar="N",
    ),
    Setting(
        "admin_chart_seconds",
        _admin_chart_seconds,
        300,
        "Seconds of messages/s and deliveries/s samples (one a second) the daemon keeps for the dashboard's "
        "chart (at most 3600).",
        metavar="SECONDS",
    ),
)

SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


@attr.s(frozen=True, auto_attribs=True)
class Settings:
    """The daemon's effective settings, after every source was applied."""

    listen: list[str]
    listen_backlog: int
    gc_threshold: int
    engine: str
    redis_timeout: float
    redis_sentinel_password: str | None
    redis_wait_replicas: int
    history_size: int
    history_ttl: float
    memory_budget: int
    idempotency_max_keys: int
    max_message_size: int
    ping_interval: float
    ping_timeout: float
    handshake_timeout: float
    publish_rate: float
    max_connections: int
    max_connections_per_ip: int
    max_subscriptions: int
    presence_max_members: int
    slow_consumer_buffer: int
    slow_consumer_grace: float
    webhook_url: str | None
    webhook_secret: str | None
    webhook_debounce: float
    webhook_retry_for: float
    webhook_timeout: float
    webhook_max_queue: int
    metrics_listen: str | None
    sse_keepalive: float
    shutdown_timeout: float
    publisher_keys_file: str | None
    publisher_keys: list[str]
    subscriber_secrets_file: str | None
    subscriber_secrets: list[str]
    require_token: bool
    token_leeway: float
    token_audience: list[str]
    allowed_origin: list[str]
    pusher_apps_file: str | None
    pusher_apps: list[str]
    pusher_activity_timeout: float
    pusher_pong_timeout: float
    pusher_client_event_rate: float
    pusher_subscription_count_interval: float
    pusher_max_data_size: int
    admin_token: str | None
    admin_max_streams: int
    admin_top_channels: int
    admin_chart_seconds: int

    @classmethod
    def defaults(cls) -> Settings:
        return cls(**{s.name: s.default for s in SETTINGS})

    def replace(self, **changes: Any) -> Settings:
        return attr.evolve(self, **changes)


def _apply(values: dict[str, Any], source: str, raw: Mapping[str, Any]) -> None:
    for key, value in raw.items():
        setting = SETTINGS_BY_NAME.get(key)
        if setting is None:
            raise ConfigError(f"{source}: unknown setting {key!r}")
        try:
            values[key] = setting.parse(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: bad value for {key!r}: {e}") from None


def read_toml(path: str) -> dict[str, Any]:
    """Read a TOML settings file; keys are the long option names with C{_}."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    return data


def load_settings(
    command_line: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """
    Combine every source into L{Settings}.

    @param command_line: values given on the command line, by setting name;
        only the ones the user gave (C{None} values are ignored).
    @param environ: the process environment (C{PUSHIE_*} are read).
    @param config_file: a TOML file; defaults to C{PUSHIE_CONFIG} if set.
    @raise ConfigError: naming the source and the setting at fault.
    """
    environ = environ or {}
    values: dict[str, Any] = {s.name: s.default for s in SETTINGS}
    path = config_file or environ.get("PUSHIE_CONFIG")
    if path:
        _apply(values, f"config file {path}", read_toml(path))
    from_env = {}
    setting: Setting | None
    for setting in SETTINGS:
        if setting.env in environ:
            from_env[setting.name] = environ[setting.env]
    _apply(values, "environment", from_env)
    given = {k: v for k, v in (command_line or {}).items() if v is not None}
    for key in given:
        setting = SETTINGS_BY_NAME.get(key)
        if setting is not None and not setting.cli:
            raise ConfigError(f"command line: {key!r} is a secret: set it in a file or the environment")
    _apply(values, "command line", given)
    _check_secret_files(values)
    try:
        pusher_apps(values)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if values["webhook_url"] and not values["webhook_secret"]:
        raise ConfigError("webhook_url needs webhook_secret: set PUSHIE_WEBHOOK_SECRET (or webhook_secret in the file)")
    from pushie.reuseport import shares_port

    shared = [d for d in values["listen"] if shares_port(d)]
    if shared and values["engine"] == "memory":
        raise ConfigError(
            f"listen {shared[0]} shares its port with other Pushie processes (one per core), but the memory engine "
            "keeps each process's channels to itself: subscribers on one would miss what is published on another. "
            "Run them on a shared Redis (engine = redis://host:port/db), or listen with tcp: for a single process; "
            "see README, Using every core"
        )
    return Settings(**values)


def pusher_apps(settings: Settings | Mapping[str, Any]) -> list[Any]:
    """
    The configured Pusher apps: the file's lines, then C{pusher_apps}.

    @raise ValueError: for an unreadable file or a bad entry.
    """
    from pushie.auth import read_secret_lines
    from pushie.doors.pusher.apps import parse_apps

    get: Callable[[str], Any] = settings.get if isinstance(settings, Mapping) else lambda name: getattr(settings, name)
    path = get("pusher_apps_file")
    lines: list[str] = []
    if path:
        try:
            lines = read_secret_lines(path)
        except OSError as e:
            raise ValueError(f"pusher_apps_file: cannot read {path}: {e.strerror}") from None
    return parse_apps(lines + list(get("pusher_apps")), path or "pusher_apps")


def _check_secret_files(values: dict[str, Any]) -> None:
    """Read the key and secret files once now, so that a bad one stops start-up."""
    from pushie.auth import check_publisher_keys, check_subscriber_secrets, read_secret_lines

    for name, check in (
        ("publisher_keys_file", check_publisher_keys),
        ("subscriber_secrets_file", check_subscriber_secrets),
    ):
        path = values.get(name)
        if not path:
            continue
        try:
            lines = read_secret_lines(path)
        except OSError as e:
            raise ConfigError(f"{name}: cannot read {path}: {e.strerror}") from None
        try:
            check(lines, path)
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None


def _show_default(value: Any) -> str:
    if value is None or value == []:
        return "none"
    if value is False:
        return "off"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    if isinstance(value, list):
        return " ".join(f"`{v}`" for v in value)
    return f"`{value}`"


def settings_reference() -> str:
    """
    The settings table for README.md, generated from L{SETTINGS} so that the
    documentation cannot drift from the code (a test checks README holds it).
    Print it with C{python -m pushie.config}.
    """
    rows = [
        "| option | environment | TOML key | default | what it does |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        if not s.cli:
            option = "(file or environment only)"
        elif s.flag:
            option = f"`--{s.option}`"
        else:
            option = f"`--{s.option} {s.metavar}`" + (" (repeatable)" if s.repeatable else "")
        env = f"`{s.env}`" + (" (space-separated)" if s.repeatable else "")
        if s.name in ("publisher_keys", "subscriber_secrets", "pusher_apps"):
            env += " (comma-separated)"
        default = _show_default(s.default)
        if s.parse is _bytes and s.default and s.default % (1 << 20) == 0:
            default = f"`{s.default >> 20}MiB`"
        rows.append(f"| {option} | {env} | `{s.name}` | {default} | {s.help} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_reference(), end="")
