"""Settings: defaults < TOML file < PUSHIE_* environment < command line."""

from __future__ import annotations

import pytest
from twisted.python.usage import UsageError

from pushie.config import ConfigError, Settings, load_settings
from pushie.tap import Options


def parse(argv, environ=None, monkeypatch=None):
    options = Options()
    options.parseOptions(argv)
    return options["settings"]


def test_defaults():
    settings = load_settings()
    assert settings == Settings.defaults()
    assert settings.listen == ["tcp:8080:interface=127.0.0.1"]
    assert settings.engine == "memory"
    assert settings.max_message_size == 65536


def test_precedence(tmp_path):
    config = tmp_path / "pushie.toml"
    config.write_text('max_message_size = 1000\nping_interval = 7\nlisten = ["tcp:1", "unix:/tmp/x"]\n')
    from_file = load_settings(config_file=str(config))
    got = (from_file.max_message_size, from_file.ping_interval, from_file.listen)
    assert got == (1000, 7.0, ["tcp:1", "unix:/tmp/x"])
    env = {"PUSHIE_MAX_MESSAGE_SIZE": "2000", "PUSHIE_LISTEN": "tcp:2 tcp:3", "PUSHIE_CONFIG": str(config)}
    from_env = load_settings(environ=env)
    assert (from_env.max_message_size, from_env.ping_interval, from_env.listen) == (2000, 7.0, ["tcp:2", "tcp:3"])
    from_argv = load_settings({"max_message_size": "3000", "listen": ["tcp:4"]}, env)
    assert (from_argv.max_message_size, from_argv.listen) == (3000, ["tcp:4"])


def test_command_line_options(monkeypatch, tmp_path):
    monkeypatch.setenv("PUSHIE_PING_TIMEOUT", "3")
    settings = parse(["--listen", "tcp:9000", "--listen", "unix:/tmp/p.sock", "--max-message-size", "10"])
    assert settings.listen == ["tcp:9000", "unix:/tmp/p.sock"]
    assert settings.max_message_size == 10
    assert settings.ping_timeout == 3.0


@pytest.mark.parametrize(
    "text,fault",
    [
        ("max_mesage_size = 10\n", "unknown setting 'max_mesage_size'"),
        ("max_message_size = 'big'\n", "bad value for 'max_message_size'"),
        ("max_message_size = 0\n", "bad value for 'max_message_size'"),
        ("max_message_size = true\n", "bad value for 'max_message_size'"),
        ("ping_interval = -1\n", "bad value for 'ping_interval'"),
        ("listen = []\n", "bad value for 'listen'"),
        ("engine = ''\n", "bad value for 'engine'"),
        ("this is not toml", "is not valid TOML"),
    ],
)
def test_bad_config_file_names_the_fault(tmp_path, text, fault):
    config = tmp_path / "pushie.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=fault.replace("(", r"\(")):
        load_settings(config_file=str(config))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(config_file=str(tmp_path / "nope.toml"))


def test_bad_environment_value_names_the_variable_source():
    with pytest.raises(ConfigError, match="environment: bad value for 'shutdown_timeout'"):
        load_settings(environ={"PUSHIE_SHUTDOWN_TIMEOUT": "soon"})


def test_bad_command_line_value_is_a_usage_error():
    with pytest.raises(UsageError, match="command line: bad value for 'max_message_size'"):
        parse(["--max-message-size", "-5"])


def test_unknown_engine_is_refused_at_build_time():
    from twisted.internet.task import Clock

    from pushie.tap import PushieService

    with pytest.raises(ValueError, match="unknown engine 'mongo'"):
        PushieService(Settings.defaults().replace(engine="mongo"), Clock())


def test_each_part_gets_its_own_settings_from_the_wiring():
    """
    Only C{pushie.tap} reads the whole L{Settings}: each part gets a frozen
    record of what it uses, and every value it needs arrives there.
    """
    import attr
    from twisted.internet.task import Clock

    from pushie.doors.pusher.door import PusherDoorSettings
    from pushie.doors.sse import SSESettings
    from pushie.tap import PushieService

    settings = Settings.defaults().replace(
        history_size=11,
        max_message_size=4321,
        handshake_timeout=6.5,
        max_subscriptions=7,
        slow_consumer_buffer=1234,
        slow_consumer_grace=3.5,
        sse_keepalive=9.0,
        allowed_origin=["https://app.example:443"],
        require_token=True,
        token_leeway=2.0,
        token_audience=["aud-1"],
        pusher_apps=["3:key3:secret3-secret3-secret3-secret3"],
        pusher_activity_timeout=40.0,
        pusher_pong_timeout=20.0,
        pusher_client_event_rate=3.0,
        pusher_max_data_size=555,
    )
    service = PushieService(settings, Clock())
    assert service.engine.history_size == 11
    guard = service.guard
    assert (guard.require_token, guard.leeway, guard.audience) == (True, 2.0, ("aud-1",))
    ws = service.websocket_factory
    assert (ws.max_subscriptions, ws.slow_consumer_buffer, ws.slow_consumer_grace) == (7, 1234, 3.5)
    assert ws.allowed_origins == ["https://app.example:443"] and ws.maxMessagePayloadSize == 4321
    assert service.pusher_factory is not None
    assert service.pusher_factory.settings == PusherDoorSettings(
        activity_timeout=40.0,
        pong_timeout=20.0,
        client_event_rate=3.0,
        max_data_size=555,
        max_message_size=4321,
        max_subscriptions=7,
        require_token=True,
        slow_consumer_buffer=1234,
        slow_consumer_grace=3.5,
    )
    events = service.site.resource.children[b"events"]
    assert events.settings == SSESettings(
        keepalive=9.0, max_subscriptions=7, slow_consumer_buffer=1234, slow_consumer_grace=3.5
    )
    assert service.site.resource.children[b"apps"].max_data_size == 555
    assert (service.site.max_body_size, service.site.timeOut) == (4321, 6.5)
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        events.settings.keepalive = 0  # type: ignore[misc]


def test_sentinel_engine_urls_and_settings_reach_the_engine():
    from twisted.internet.task import Clock

    from pushie.tap import PushieService

    url = "redis+sentinel://:s%40cret@10.0.0.1:26380,10.0.0.2/mymaster/2"
    settings = load_settings(
        {"engine": url, "redis_wait_replicas": 1},
        environ={"PUSHIE_REDIS_SENTINEL_PASSWORD": "sentinel-secret"},
    )
    assert (settings.engine, settings.redis_wait_replicas) == (url, 1)
    assert settings.redis_sentinel_password == "sentinel-secret"
    service = PushieService(settings, Clock())
    engine = service.engine
    assert engine.config["sentinels"] == [("10.0.0.1", 26380), ("10.0.0.2", 26379)]
    assert (engine.config["service"], engine.config["db"], engine.config["password"]) == ("mymaster", 2, "s@cret")
    assert (engine.sentinel_password, engine.wait_replicas) == ("sentinel-secret", 1)
    assert engine.name == "redis+sentinel://10.0.0.1:26380,10.0.0.2:26379/mymaster/2"
    assert engine.prefix == "pushie:2:"
    assert load_settings({"engine": "rediss+sentinel://h/svc"}).engine == "rediss+sentinel://h/svc"
    assert Settings.defaults().redis_wait_replicas == 0


@pytest.mark.parametrize(
    "url,fault",
    [
        ("redis+sentinel://h:port/svc/0", "a sentinel's port must be a number"),
        ("redis+sentinel://h1,,h2/svc/0", "names one or more sentinels"),
        ("redis+sentinel:///svc", "names one or more sentinels"),
        ("redis+sentinel://h:26379", "names the service"),
        ("redis+sentinel://h:26379/svc/zero", "the Redis database must be a number"),
        ("redis+sentinel://h:26379/svc/0?x=1", "takes no query"),
        ("redis+cluster://h/0", "expected 'memory', a redis:// URL"),
    ],
)
def test_bad_sentinel_urls_say_what_to_write(url, fault):
    with pytest.raises(ConfigError, match="bad value for 'engine': .*" + fault):
        load_settings({"engine": url})


def test_redis_wait_replicas_is_a_count():
    with pytest.raises(ConfigError, match="bad value for 'redis_wait_replicas'"):
        load_settings({"redis_wait_replicas": -1})
    with pytest.raises(UsageError, match="--redis-sentinel-password not recognized"):
        parse(["--redis-sentinel-password", "x"])  # a secret: never on the command line
