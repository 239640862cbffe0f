"""
Authentication against a real daemon: publisher keys, subscriber tokens,
channel classes, refresh and expiry, origins; plus property tests that throw
random headers, tokens and claims at the Guard.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from pushie.auth import Guard, ReloadableList, check_publisher_keys, check_subscriber_secrets, mint_token
from pushie.config import ConfigError, load_settings
from pushie.errors import PushieError
from tests.helpers import raw_handshake, sleep

KEY_A = "publisher-key-aaaaaaaaaaaaaaaa"
KEY_B = "publisher-key-bbbbbbbbbbbbbbbb"
SECRET_1 = "subscriber-secret-one-1111111111111111"
SECRET_2 = "subscriber-secret-two-2222222222222222"


def token(secret=SECRET_1, sub="u1", channels=("private-a",), ttl=60.0, **extra):
    claims = {"sub": sub, "channels": list(channels), "exp": time.time() + ttl, **extra}
    return jwt.encode(claims, secret, algorithm="HS256")


def unsigned(claims: dict, alg: str = "none") -> str:
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': alg, 'typ': 'JWT'})}.{part(claims)}."


@pytest_twisted.async_yield_fixture
async def secured(make_daemon):
    yield await make_daemon(publisher_keys=[KEY_A, KEY_B], subscriber_secrets=[SECRET_1, SECRET_2])


# -- publisher keys ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_both_publisher_keys_publish(secured):
    for key in (KEY_A, KEY_B):
        status, body, _ = await secured.publish(
            {"channel": "c", "data": key}, headers={"Authorization": f"Bearer {key}"}
        )
        assert status == 200, body
    assert body["offset"] == 2


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", f"Basic {KEY_A}", f"Bearer {KEY_A}x", f"Bearer {KEY_A[:-1]}", "Bearer wrong"],
)
@pytest_twisted.ensureDeferred
async def test_bad_publisher_key_is_401_and_publishes_nothing(secured, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    status, body, response = await secured.publish({"channel": "c", "data": 1}, headers=headers)
    assert (status, body["error"]) == (401, "unauthorized")
    assert response.headers.getRawHeaders("www-authenticate")[0].startswith('Bearer realm="pushie"')
    status, body, _ = await secured.publish({"channel": "c", "data": 2}, headers={"Authorization": f"Bearer {KEY_A}"})
    assert body["offset"] == 1


@pytest_twisted.ensureDeferred
async def test_publisher_keys_file_is_reloaded_when_it_changes(make_daemon, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# rotated monthly\n{KEY_A}\n")
    daemon = await make_daemon(publisher_keys_file=str(keys))
    ok = await daemon.publish({"channel": "c", "data": 1}, headers={"Authorization": f"Bearer {KEY_A}"})
    assert ok[0] == 200
    keys.write_text(f"{KEY_B}\n")
    os.utime(keys, (time.time() + 5, time.time() + 5))
    await sleep(1.1)
    old = await daemon.publish({"channel": "c", "data": 2}, headers={"Authorization": f"Bearer {KEY_A}"})
    new = await daemon.publish({"channel": "c", "data": 3}, headers={"Authorization": f"Bearer {KEY_B}"})
    assert (old[0], new[0]) == (401, 200)
    # A file that turns bad keeps the last good keys.
    keys.write_text("short\n")
    os.utime(keys, (time.time() + 10, time.time() + 10))
    await sleep(1.1)
    still = await daemon.publish({"channel": "c", "data": 4}, headers={"Authorization": f"Bearer {KEY_B}"})
    assert still[0] == 200


def test_keys_and_secrets_are_checked_at_start(tmp_path):
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        load_settings(environ={"PUSHIE_SUBSCRIBER_SECRETS": "too-short"})
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_settings(environ={"PUSHIE_PUBLISHER_KEYS": "short"})
    with pytest.raises(ConfigError, match="publisher_keys_file: cannot read"):
        load_settings({"publisher_keys_file": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="is a secret"):
        load_settings({"subscriber_secrets": [SECRET_1]})
    settings = load_settings(environ={"PUSHIE_PUBLISHER_KEYS": f"{KEY_A}, {KEY_B}", "PUSHIE_REQUIRE_TOKEN": "1"})
    assert settings.publisher_keys == [KEY_A, KEY_B] and settings.require_token


def test_secrets_are_not_command_line_options():
    from twisted.python.usage import UsageError

    from pushie.tap import Options

    for option in ("--subscriber-secrets", "--publisher-keys"):
        with pytest.raises(UsageError):
            Options().parseOptions([option, "x" * 40])


# -- subscriber tokens at the handshake ------------------------------------


async def first_frames(daemon, query, count):
    client = await daemon.connect(query)
    return client, [await client.next() for _ in range(count)]


@pytest_twisted.ensureDeferred
async def test_granting_tokens_from_either_secret(secured):
    for secret in (SECRET_1, SECRET_2):
        client, frames = await first_frames(secured, f"channel=private-a&token={token(secret)}", 2)
        assert frames[1]["type"] == "subscribed" and frames[1]["channel"] == "private-a"
    await secured.publish({"channel": "private-a", "data": "secret"}, headers={"Authorization": f"Bearer {KEY_A}"})
    assert (await client.next_of("message"))["data"] == "secret"


@pytest.mark.parametrize(
    "grants,channel,ok",
    [
        (["private-a"], "private-a", True),
        (["private-*"], "private-anything", True),
        (["*"], "presence-room", True),
        (["private-a"], "private-ab", False),
        (["private-a*"], "private-b", False),
        ([], "private-a", False),
    ],
)
@pytest_twisted.ensureDeferred
async def test_grants_exact_and_by_prefix(secured, grants, channel, ok):
    status, client = await raw_handshake(secured.port, f"/websocket?channel={channel}&token={token(channels=grants)}")
    assert status == (101 if ok else 403)
    client.transport.loseConnection()
    await client.lost


BAD_TOKENS = {
    "expired": lambda: token(ttl=-60),
    "wrong secret": lambda: token(secret="another-secret-that-is-long-enough-xx"),
    "alg none": lambda: unsigned({"sub": "u1", "channels": ["*"], "exp": time.time() + 60}),
    "HS512": lambda: jwt.encode(
        {"sub": "u", "channels": ["*"], "exp": time.time() + 60}, SECRET_1 * 2, algorithm="HS512"
    ),
    "no exp": lambda: jwt.encode({"sub": "u", "channels": ["*"]}, SECRET_1, algorithm="HS256"),
    "no sub": lambda: jwt.encode({"channels": ["*"], "exp": time.time() + 60}, SECRET_1, algorithm="HS256"),
    "bad channels": lambda: token(channels=["ok", 5]),
    "malformed": lambda: "not.a.jwt",
    "garbage": lambda: "%00%ff",
    "tampered": lambda: token()[:-4] + "AAAA",
}


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
@pytest_twisted.ensureDeferred
async def test_bad_tokens_are_401_at_the_handshake(secured, name):
    bad = BAD_TOKENS[name]()
    for channel in ("private-a", "public"):
        status, client = await raw_handshake(secured.port, f"/websocket?channel={channel}&token={bad}")
        assert status == 401, (name, channel)
        assert bad.encode() not in client.received
        await client.lost


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
@pytest_twisted.ensureDeferred
async def test_bad_tokens_in_frames_give_unauthorized(secured, name):
    client, _ = await first_frames(secured, "", 1)
    client.send({"type": "subscribe", "channel": "private-a", "token": BAD_TOKENS[name]()})
    error = await client.next_of("error")
    assert (error["code"], error["channel"]) == ("unauthorized", "private-a")
    client.send({"type": "auth", "token": BAD_TOKENS[name]()})
    assert (await client.next_of("error"))["code"] == "unauthorized"
    client.send({"type": "ping"})
    assert await client.next() == {"type": "pong"}


@pytest_twisted.ensureDeferred
async def test_subscribe_frames_need_granting_tokens(secured):
    client, _ = await first_frames(secured, "", 1)
    client.send({"type": "subscribe", "channel": "presence-room"})
    assert (await client.next_of("error"))["code"] == "unauthorized"
    client.send({"type": "subscribe", "channel": "private-b", "token": token(channels=["private-a"])})
    error = await client.next_of("error")
    assert (error["code"], error["channel"]) == ("forbidden", "private-b")
    # The token given in the refused frame is now the connection's token.
    client.send({"type": "subscribe", "channel": "private-a"})
    assert (await client.next_of("subscribed"))["channel"] == "private-a"
    client.send({"type": "subscribe", "channel": "public"})
    assert (await client.next_of("subscribed"))["channel"] == "public"


@pytest_twisted.ensureDeferred
async def test_require_token_guards_every_channel(make_daemon):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1], require_token=True)
    status, client = await raw_handshake(daemon.port, "/websocket?channel=public")
    assert status == 401
    await client.lost
    status, client = await raw_handshake(daemon.port, f"/websocket?channel=public&token={token(channels=['pub*'])}")
    assert status == 101
    client.transport.loseConnection()
    await client.lost


@pytest_twisted.ensureDeferred
async def test_without_secrets_tokens_are_refused(daemon):
    status, client = await raw_handshake(daemon.port, f"/websocket?channel=private-a&token={token()}")
    assert status == 401
    await client.lost


# -- refresh and expiry -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_expiry_closes_with_4001_unless_refreshed(make_daemon):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1], token_leeway=0.0)
    refreshed, _ = await first_frames(daemon, f"channel=private-a&token={token(ttl=1.5)}", 2)
    expiring, _ = await first_frames(daemon, f"channel=private-a&token={token(ttl=1.5)}", 2)
    public_only, _ = await first_frames(daemon, f"channel=news&token={token(ttl=1.5)}", 2)
    refreshed.send({"type": "auth", "token": token(ttl=60)})
    answer = await refreshed.next_of("authorized")
    assert answer["sub"] == "u1" and answer["exp"] > time.time() + 50
    code, reason = await expiring.closed
    assert code == 4001
    await sleep(0.5)
    assert not refreshed.closed.called and not public_only.closed.called
    await daemon.publish({"channel": "private-a", "data": "still"})
    assert (await refreshed.next_of("message"))["data"] == "still"


@pytest_twisted.ensureDeferred
async def test_unsubscribing_guarded_channels_stops_the_expiry(make_daemon):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1], token_leeway=0.0)
    client, _ = await first_frames(daemon, f"channel=private-a&channel=news&token={token(ttl=1.2)}", 3)
    client.send({"type": "unsubscribe", "channel": "private-a"})
    await client.next_of("unsubscribed")
    await sleep(2.0)
    assert not client.closed.called


# -- origins ----------------------------------------------------------------


@pytest.mark.parametrize(
    "origin,status",
    [
        ("https://app.example.com", 101),
        ("https://app.example.com:443", 101),
        ("https://app.example.com:8443", 403),
        ("http://app.example.com", 403),
        ("https://evil.example.net", 403),
        ("null", 403),
        (None, 101),
    ],
)
@pytest_twisted.ensureDeferred
async def test_allowed_origins(make_daemon, origin, status):
    daemon = await make_daemon(allowed_origin=["https://app.example.com:443"])
    extra = f"Origin: {origin}\r\n" if origin else ""
    got, client = await raw_handshake(daemon.port, "/websocket?channel=a", extra)
    assert got == status
    client.transport.loseConnection()
    await client.lost


@pytest_twisted.ensureDeferred
async def test_any_origin_by_default(daemon):
    for origin in ("https://anything.example:1234", "null"):
        got, client = await raw_handshake(daemon.port, "/websocket", f"Origin: {origin}\r\n")
        assert got == 101
        client.transport.loseConnection()
        await client.lost


# -- the token command ------------------------------------------------------


def run_pushie(*args, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHIE_")}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return subprocess.run([sys.executable, "-m", "pushie.cli", *args], capture_output=True, text=True, env=full_env)


def test_token_command_signs_with_the_first_secret(tmp_path):
    done = run_pushie(
        "token",
        "--sub",
        "42",
        "--channel",
        "private-*",
        "--channel",
        "news",
        "--ttl",
        "120",
        "--info",
        '{"n": "Ann"}',
        env={"PUSHIE_SUBSCRIBER_SECRETS": f"{SECRET_1},{SECRET_2}"},
    )
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), SECRET_1, algorithms=["HS256"])
    assert claims["sub"] == "42" and claims["channels"] == ["private-*", "news"] and claims["info"] == {"n": "Ann"}
    assert 100 < claims["exp"] - time.time() <= 120
    secrets = tmp_path / "secrets"
    secrets.write_text(f"{SECRET_2}\n{SECRET_1}\n")
    done = run_pushie("token", "--sub", "x", "--channel", "a", "--subscriber-secrets-file", str(secrets))
    assert jwt.decode(done.stdout.strip(), SECRET_2, algorithms=["HS256"])["sub"] == "x"


def test_token_command_without_a_secret_says_what_to_do():
    done = run_pushie("token", "--sub", "x", "--channel", "a")
    assert done.returncode == 2 and "PUSHIE_SUBSCRIBER_SECRETS" in done.stderr and not done.stdout


# -- properties: no crash, no accidental grant -------------------------------


def make_guard(**kw):
    clock = Clock()
    clock.advance(1_800_000_000)
    return Guard(
        clock=clock,
        publisher_keys=ReloadableList([KEY_A, KEY_B], None, clock, check_publisher_keys, "keys"),
        subscriber_secrets=ReloadableList([SECRET_1, SECRET_2], None, clock, check_subscriber_secrets, "secrets"),
        leeway=0.0,
        **kw,
    )


@settings(max_examples=300)
@given(st.binary(max_size=80) | st.sampled_from([b"Bearer " + KEY_A.encode(), b"bearer  " + KEY_B.encode()]))
def test_publisher_header_property(header):
    guard = make_guard()
    try:
        guard.check_publisher(header)
    except PushieError as e:
        assert e.status == 401
        granted = False
    else:
        granted = True
    scheme, _, rest = header.partition(b" ")
    assert granted == (scheme.lower() == b"bearer" and rest.strip() in (KEY_A.encode(), KEY_B.encode()))


CHANNELS = st.sampled_from(["private-a", "private-ab", "presence-r", "news", "private-", "x"])
GRANTS = st.lists(st.sampled_from(["private-a", "private-*", "private-a*", "*", "news", "pres*", "x"]), max_size=3)


@settings(max_examples=300)
@given(
    grants=GRANTS,
    channel=CHANNELS,
    secret=st.sampled_from([SECRET_1, SECRET_2, "wrong-secret-but-long-enough-000000000"]),
    alg=st.sampled_from(["HS256", "HS384", "none"]),
    offset=st.integers(-100, 100),
    require=st.booleans(),
)
def test_token_property_grants_exactly_what_the_rules_say(grants, channel, secret, alg, offset, require):
    guard = make_guard(require_token=require)
    now = guard.clock.seconds()
    claims = {"sub": "u", "channels": grants, "exp": now + offset}
    raw = unsigned(claims) if alg == "none" else jwt.encode(claims, secret, algorithm=alg)
    try:
        verified = guard.verify_token(raw)
        guard.check_subscribe(channel, verified)
        granted = True
    except PushieError as e:
        assert e.status in (401, 403) and e.code in ("unauthorized", "forbidden")
        granted = False
    genuine = alg == "HS256" and secret != "wrong-secret-but-long-enough-000000000" and offset >= 0
    matches = any(g == channel or (g.endswith("*") and channel.startswith(g[:-1])) for g in grants)
    needs = require or channel.startswith(("private-", "presence-"))
    assert granted == (genuine and (matches or not needs))


@settings(max_examples=300)
@given(st.text(max_size=300) | st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode()))
def test_random_tokens_never_crash_or_grant(raw):
    guard = make_guard()
    with pytest.raises(PushieError):
        guard.check_subscribe("private-a", guard.verify_token(raw))


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.sampled_from(["sub", "exp", "channels", "info", "nbf", "iat"]),
        st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.lists(st.text(max_size=5)),
    )
)
def test_random_claims_never_crash(claims):
    guard = make_guard()
    raw = jwt.encode(claims, SECRET_1, algorithm="HS256")
    try:
        guard.check_subscribe("private-a", guard.verify_token(raw))
    except PushieError as e:
        assert e.status in (401, 403)


def test_mint_token_round_trips():
    guard = make_guard()
    raw = mint_token(SECRET_2, "7", ["private-*"], 60, guard.clock.seconds(), {"name": "Ann"})
    verified = guard.verify_token(raw)
    assert (verified.sub, verified.info, verified.grants("private-x")) == ("7", {"name": "Ann"}, True)
