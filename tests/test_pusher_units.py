"""
The Pusher door's pure parts: the signature vectors of Pusher's references,
app parsing, and channel kinds matched by anchored prefixes.
"""

from __future__ import annotations

import json

import pytest

from pushie.doors.pusher.apps import (
    App,
    Apps,
    api_string_to_sign,
    body_md5,
    channel_auth_string,
    is_cache,
    is_encrypted,
    is_pusher_channel,
    is_pusher_presence,
    is_pusher_private,
    is_valid_api_channel,
    is_valid_socket_id,
    parse_apps,
)
from pushie.doors.pusher.door import positioned_frame, publication_frame, skip_frame
from pushie.records import Publication

KEY = "278d425bdf160c739803"
SECRET = "7ad3773142a6692b25b8"
APP = App("3", KEY, SECRET, primary=True)


def test_private_channel_signature_vector():
    text = channel_auth_string("1234.1234", "private-foobar")
    assert APP.sign(text) == "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
    assert APP.check_auth(f"{KEY}:{APP.sign(text)}", text)


def test_auth_refused_for_wrong_key_signature_or_type():
    text = channel_auth_string("1234.1234", "private-foobar")
    good = APP.sign(text)
    assert not APP.check_auth(f"otherkey:{good}", text)
    assert not APP.check_auth(f"{KEY}:{good[:-1]}0", text)
    assert not APP.check_auth(good, text)
    assert not APP.check_auth(None, text)
    assert not APP.check_auth(f"{KEY}:{good}", channel_auth_string("1234.1235", "private-foobar"))


def test_http_api_signature_vector():
    body = b'{"name":"foo","channels":["project-3"],"data":"{\\"some\\":\\"data\\"}"}'
    assert body_md5(body) == "ec365a775a4cd0599faeb73354201b6f"
    params = {
        "auth_key": KEY,
        "auth_timestamp": "1353088179",
        "auth_version": "1.0",
        "body_md5": body_md5(body),
    }
    signature = APP.sign(api_string_to_sign("POST", "/apps/3/events", params))
    assert signature == "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
    # auth_signature itself is never part of the string; keys sort lower-cased.
    assert api_string_to_sign("post", "/p", {"B": "2", "a": "1", "auth_signature": "x"}) == "POST\n/p\na=1&b=2"


def test_presence_string_includes_channel_data():
    assert channel_auth_string("1.2", "presence-x", '{"user_id":"u"}') == '1.2:presence-x:{"user_id":"u"}'


@pytest.mark.parametrize(
    "name, private, presence, encrypted, cache",
    [
        ("private-a", True, False, False, False),
        ("private-encrypted-a", True, False, True, False),
        ("presence-a", False, True, False, False),
        ("x-private-y", False, False, False, False),
        ("public-presence-", False, False, False, False),
        ("cache-a", False, False, False, True),
        ("private-cache-a", True, False, False, True),
        ("presence-cache-a", False, True, False, True),
        ("xcache-a", False, False, False, False),
    ],
)
def test_channel_kinds_are_anchored_prefixes(name, private, presence, encrypted, cache):
    assert (is_pusher_private(name), is_pusher_presence(name), is_encrypted(name), is_cache(name)) == (
        private,
        presence,
        encrypted,
        cache,
    )


def test_channel_names():
    assert is_pusher_channel("a-Z_0=@,.;")
    assert is_pusher_channel("x" * 164)
    assert not is_pusher_channel("x" * 165)
    assert not is_pusher_channel("")
    assert not is_pusher_channel("a:b")  # valid natively, not in Pusher
    assert not is_pusher_channel("#server-to-user-1")
    assert is_valid_api_channel("#server-to-user-1")
    assert not is_valid_api_channel("#server-to-user-")
    assert not is_valid_api_channel("#other")
    assert is_valid_socket_id("123.456")
    assert not is_valid_socket_id("123")
    assert not is_valid_socket_id("a.b")


def test_apps_parse_and_spaces():
    apps = Apps(parse_apps(["1:key-one:0123456789abcdef", " 2:key-two:fedcba9876543210 "], "test"))
    first, second = apps.all
    assert first.primary and not second.primary
    assert apps.by_key("key-two") is second and apps.by_id("1") is first
    assert first.hub_name("news") == "news"
    assert second.hub_name("news") == "2|news"
    assert second.channel_name("2|news") == "news"
    assert first.owns("news") and not first.owns("2|news")
    assert second.owns("2|news") and not second.owns("news")
    assert apps.owner("2|presence-x") is second and apps.owner("x") is first


@pytest.mark.parametrize(
    "entries, message",
    [
        (["1:key"], "id:key:secret"),
        (["1:key:short"], "at least 16"),
        (["1:k!y:0123456789abcdef"], "may hold only"),
        (["1:k y:0123456789abcdef"], "no spaces"),
        (["1:a:0123456789abcdef enabled=maybe"], "enabled must be true or false"),
        (["1:a:0123456789abcdef max_connections=-1"], "max_connections must be a whole number"),
        (["1:a:0123456789abcdef client_event_rate=nan"], "client_event_rate must be a number"),
        (["1:a:0123456789abcdef quota=3"], "unknown option 'quota=3'"),
        (["1:a:0123456789abcdef enabled=true enabled=false"], "enabled is given twice"),
        (["1:a:0123456789abcdef", "1:b:0123456789abcdef"], "unique"),
        (["1:a:0123456789abcdef", "2:a:0123456789abcdef"], "unique"),
    ],
)
def test_bad_apps_are_refused(entries, message):
    with pytest.raises(ValueError, match=message):
        parse_apps(entries, "pusher_apps")


def test_app_options():
    plain, tuned = parse_apps(
        ["1:a:0123456789abcdef", "2:b:0123456789abcdef  enabled=false max_connections=3 client_event_rate=0.5"], "x"
    )
    assert (plain.enabled, plain.max_connections, plain.client_event_rate) == (True, 0, None)
    assert (tuned.enabled, tuned.max_connections, tuned.client_event_rate) == (False, 3, 0.5)
    assert not tuned.primary and plain.primary


def test_apps_from_environment_file_and_toml(tmp_path):
    from pushie.config import ConfigError, load_settings, pusher_apps

    env = {"PUSHIE_PUSHER_APPS": f"3:{KEY}:{SECRET}, 4:other:0123456789abcdef"}
    apps = pusher_apps(load_settings(environ=env))
    assert [(a.id, a.key, a.primary) for a in apps] == [("3", KEY, True), ("4", "other", False)]

    listed = tmp_path / "apps"
    listed.write_text(f"# id:key:secret\n7:filekey:{SECRET}\n")
    settings = load_settings({"pusher_apps_file": str(listed)}, env)
    assert [a.id for a in pusher_apps(settings)] == ["7", "3", "4"]  # the file's come first

    toml = tmp_path / "pushie.toml"
    toml.write_text(f'pusher_apps = ["9:tomlkey:{SECRET}"]\npusher_client_event_rate = 0\n')
    settings = load_settings(config_file=str(toml))
    assert [a.key for a in pusher_apps(settings)] == ["tomlkey"] and settings.pusher_client_event_rate == 0

    with pytest.raises(ConfigError, match="id:key:secret"):
        load_settings(environ={"PUSHIE_PUSHER_APPS": "3:nokey"})
    with pytest.raises(ConfigError, match="unique"):
        load_settings({"pusher_apps_file": str(listed)}, {"PUSHIE_PUSHER_APPS": f"7:x:{SECRET}"})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings({"pusher_apps_file": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="secret"):
        load_settings({"pusher_apps": f"3:{KEY}:{SECRET}"})  # secrets never on the command line


def test_apps_file_keeps_the_last_good_apps(tmp_path):
    from pushie.doors.pusher.apps import AppsFile

    path = tmp_path / "apps"
    path.write_text("1:a:0123456789abcdef nope\n")
    with pytest.raises(ValueError, match="cannot use Pusher apps file .*unknown option 'nope'"):
        AppsFile(str(path), [])
    path.write_text("1:a:0123456789abcdef\n")
    watched = AppsFile(str(path), ["2:b:0123456789abcdef"])
    assert [(a.id, a.primary) for a in watched.apps] == [("1", True), ("2", False)]
    assert not watched.refresh()  # unchanged: not read again
    path.unlink()
    assert not watched.refresh() and [a.id for a in watched.apps] == ["1", "2"]
    path.write_text("3:c:0123456789abcdef enabled=false\n")
    assert watched.refresh()
    assert [(a.id, a.enabled) for a in watched.apps] == [("3", False), ("2", True)]
    assert watched.refresh(force=True)  # SIGHUP: read again, changed or not


def test_positioned_and_skip_frames_extend_pusher_frames_by_one_field():
    """The recovery extension's frames (PROTOCOL §13.1): Pusher's frame, then the position; built without json.dumps."""
    other = App("9", "otherkey", SECRET)
    publication = Publication(other.hub_name("presence-room"), 18, "kJ3n-\u00e9", b'"{\\"a\\":1}"', "e\u00e9", "u1")
    plain, _ = publication_frame(publication, other)
    positioned, frame = positioned_frame(publication, other)
    assert positioned.startswith(plain[:-1])
    assert json.loads(positioned) == {**json.loads(plain), "pushie": {"offset": 18, "epoch": "kJ3n-\u00e9"}}
    assert list(json.loads(positioned))[-1] == "pushie"
    assert frame.endswith(positioned) and frame[0] == 0x81
    skip = skip_frame(publication, other)
    assert json.loads(skip[skip.index(b"{") :]) == {
        "event": "pusher_internal:pushie_skip",
        "channel": "presence-room",
        "data": "{}",
        "pushie": {"offset": 18, "epoch": "kJ3n-\u00e9"},
    }
