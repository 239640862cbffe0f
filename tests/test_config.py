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
