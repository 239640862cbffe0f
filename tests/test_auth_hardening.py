"""
Authorisation at the edges (issue 12, A1, A2, A10, A14), against a real daemon
with real clients on both engines:

  - C{require_token} is not bypassed by the Pusher door;
  - a token refresh re-checks every held channel and never changes a presence
    member's identity;
  - time claims that are not finite numbers (C{NaN}, C{Infinity}, strings) and
    times in the future (C{iat}, C{nbf}) are refused on every surface;
  - C{aud} is checked as PyJWT checks it;
  - the Pusher HTTP API answers an unknown app id as it answers a wrong key.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import jwt
import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.utils import getProcessOutputAndValue

from pushie.errors import PushieError
from tests.helpers import raw_handshake
from tests.test_auth import SECRET_1, make_guard, token
from tests.test_pusher import APPS, KEY, OTHER_KEY, SDK, api, connect, expect, next_event, signed_query, subscribe
from tests.test_sse import open_stream


async def first_frames(daemon, query, count):
    client = await daemon.connect(query)
    return client, [await client.next() for _ in range(count)]


async def nothing_more(client) -> None:
    """Whatever was sent before a ping arrives before its pong: nothing but the pong may come."""
    client.send({"type": "ping"})
    assert await client.next() == {"type": "pong"}


async def pusher_nothing_more(client) -> None:
    client.send({"event": "pusher:ping", "data": {}})
    assert (await next_event(client))["event"] == "pusher:pong"


# -- A1: require_token and the Pusher door -----------------------------------


@pytest_twisted.ensureDeferred
async def test_require_token_is_not_bypassed_by_the_pusher_door(make_daemon):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1], require_token=True, pusher_apps=APPS)
    sdk = SDK(daemon)
    native, _ = await first_frames(daemon, f"channel=news&token={token(channels=['news'])}", 2)
    pusher = await connect(daemon)
    for channel in ("news", "cache-news"):
        pusher.send({"event": "pusher:subscribe", "data": {"channel": channel}})
        await expect(pusher, "pusher:error")
        refused = await expect(pusher, "pusher:subscription_error")
        assert refused["channel"] == channel
        assert (refused["data"]["type"], refused["data"]["status"]) == ("AuthError", 401)
    # Neither a native publish nor a signed trigger reaches the refused socket.
    await daemon.publish({"channel": "news", "data": "scoop"})
    await sdk("trigger", "news", "story", {"n": 1})
    assert (await native.next_of("message"))["data"] == "scoop"
    assert json.loads((await native.next_of("message"))["data"]) == {"n": 1}
    await pusher_nothing_more(pusher)
    # A client event cannot be sent to the refused public channel either.
    pusher.send({"event": "client-x", "channel": "news", "data": {}})
    await expect(pusher, "pusher:error")
    await nothing_more(native)
    # Private and presence channels, signed with the app's secret, still work.
    await subscribe(pusher, "private-orders", **sdk.authenticate("private-orders", pusher.socket_id))
    await daemon.publish({"channel": "private-orders", "data": "x"})
    assert (await expect(pusher, "message"))["channel"] == "private-orders"
    member = {"user_id": "7", "user_info": {}}
    await subscribe(pusher, "presence-room", **sdk.authenticate("presence-room", pusher.socket_id, member))
    # Another app's channels are its own space, not the native one: not covered.
    other = await connect(daemon, key=OTHER_KEY)
    await subscribe(other, "news")


@pytest_twisted.ensureDeferred
async def test_without_require_token_pusher_public_channels_stay_open(make_daemon):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1], pusher_apps=APPS)
    pusher = await connect(daemon)
    await subscribe(pusher, "news")
    await daemon.publish({"channel": "news", "data": "open"})
    assert (await expect(pusher, "message"))["data"] == "open"


# -- A2: a refresh re-checks the grants ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_refresh_for_another_sub_granting_nothing_drops_the_private_channel(make_daemon):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1], token_leeway=0.0)
    client, _ = await first_frames(daemon, f"channel=private-payroll&token={token(channels=['private-payroll'])}", 2)
    client.send({"type": "auth", "token": token(sub="u2", channels=[])})
    dropped = await client.next_of("unsubscribed")
    assert (dropped["channel"], dropped["code"]) == ("private-payroll", "forbidden")
    assert (await client.next_of("authorized"))["sub"] == "u2"
    await daemon.publish({"channel": "private-payroll", "data": "salaries"})
    await nothing_more(client)
    assert daemon.hub.subscriber_count("private-payroll") == 0
    # The dropped channel is not held: no 4001 when the new token expires, and
    # subscribing again needs a token that grants it.
    client.send({"type": "subscribe", "channel": "private-payroll"})
    assert (await client.next_of("error"))["code"] == "forbidden"


@pytest_twisted.ensureDeferred
async def test_refresh_keeps_what_it_grants_and_drops_the_rest(make_daemon):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1])
    both = token(channels=["private-a", "private-b"])
    client, _ = await first_frames(daemon, f"channel=private-a&channel=private-b&channel=news&token={both}", 4)
    # A token in a subscribe frame is a refresh too.
    client.send({"type": "subscribe", "channel": "public", "token": token(channels=["private-b"])})
    assert (await client.next_of("unsubscribed"))["channel"] == "private-a"
    assert (await client.next_of("subscribed"))["channel"] == "public"
    for channel in ("private-a", "private-b", "news"):
        await daemon.publish({"channel": channel, "data": channel})
    assert [(await client.next_of("message"))["data"] for _ in range(2)] == ["private-b", "news"]
    await nothing_more(client)


@pytest_twisted.ensureDeferred
async def test_refresh_with_require_token_rechecks_public_channels(make_daemon):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1], require_token=True)
    client, _ = await first_frames(daemon, f"channel=news&token={token(channels=['news'])}", 2)
    client.send({"type": "auth", "token": token(channels=["sport"])})
    assert (await client.next_of("unsubscribed"))["channel"] == "news"
    await client.next_of("authorized")
    await daemon.publish({"channel": "news", "data": 1})
    await nothing_more(client)


@pytest_twisted.ensureDeferred
async def test_refresh_cannot_change_a_presence_members_identity(make_daemon):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1])
    grants = ["presence-room", "private-*"]
    client, _ = await first_frames(daemon, f"channel=presence-room&token={token(sub='u1', channels=grants)}", 2)
    for frame in (
        {"type": "auth", "token": token(sub="u2", channels=grants)},
        {"type": "subscribe", "channel": "private-x", "token": token(sub="u2", channels=grants)},
    ):
        client.send(frame)
        error = await client.next_of("error")
        assert error["code"] == "identity_changed"
        assert error.get("channel") == frame.get("channel")
    client.send({"type": "presence", "channel": "presence-room"})
    assert [m["id"] for m in (await client.next_of("presence"))["members"]] == ["u1"]
    # The old token stays; a refresh for the same sub is fine.
    client.send({"type": "auth", "token": token(sub="u1", channels=grants, ttl=120)})
    assert (await client.next_of("authorized"))["sub"] == "u1"
    # Once the presence channel is left, another sub may take over.
    client.send({"type": "unsubscribe", "channel": "presence-room"})
    await client.next_of("unsubscribed")
    client.send({"type": "auth", "token": token(sub="u2", channels=grants)})
    assert (await client.next_of("authorized"))["sub"] == "u2"


@pytest_twisted.ensureDeferred
async def test_refresh_that_drops_presence_leaves_the_member_list(make_daemon):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1])
    watcher, _ = await first_frames(daemon, f"channel=presence-room&token={token(sub='w', channels=['*'])}", 2)
    client, _ = await first_frames(daemon, f"channel=presence-room&token={token(sub='u1', channels=['*'])}", 2)
    assert (await watcher.next_of("join"))["member"]["id"] == "u1"
    client.send({"type": "auth", "token": token(sub="u1", channels=["private-*"])})
    assert (await client.next_of("unsubscribed"))["channel"] == "presence-room"
    await client.next_of("authorized")
    assert (await watcher.next_of("leave"))["member"]["id"] == "u1"


# -- A10 and A14: time claims and audience -----------------------------------


def claims_token(**claims) -> str:
    base = {"sub": "u1", "channels": ["private-a", "news"], "exp": time.time() + 60}
    base.update(claims)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, SECRET_1, algorithm="HS256")


NAN, INF = float("nan"), float("inf")
REFUSED_CLAIMS = {
    "exp NaN": {"exp": NAN},
    "exp Infinity": {"exp": INF},
    "exp -Infinity": {"exp": -INF},
    "exp string": {"exp": str(int(time.time()) + 60)},
    "exp true": {"exp": True},
    "exp beyond 9999": {"exp": 10**20},
    "nbf NaN": {"nbf": NAN},
    "nbf Infinity": {"nbf": INF},
    "nbf in the future": {"nbf": time.time() + 3600},
    "iat NaN": {"iat": NAN},
    "iat Infinity": {"iat": INF},
    "iat string": {"iat": "yesterday"},
    "iat in the future": {"iat": time.time() + 3600},
    "aud without token_audience": {"aud": "another-service"},
    # Claims that Python's json reads but RFC 8259 does not allow: they would reach presence frames.
    "info NaN": {"info": {"score": NAN}},
    "info Infinity": {"info": [INF]},
    "info lone surrogate": {"info": {"name": "\ud800"}},
}


@pytest.mark.parametrize("name", sorted(REFUSED_CLAIMS))
@pytest_twisted.ensureDeferred
async def test_bad_time_and_audience_claims_are_refused_everywhere(make_daemon, name):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1])
    bad = claims_token(**REFUSED_CLAIMS[name])
    # In the URL of a WebSocket handshake: 401.
    status, raw = await raw_handshake(daemon.port, f"/websocket?channel=private-a&token={bad}")
    assert status == 401, name
    await raw.lost
    # In auth and subscribe frames: an error frame, and the connection stays.
    client, _ = await first_frames(daemon, "", 1)
    client.send({"type": "auth", "token": bad})
    assert (await client.next_of("error"))["code"] == "unauthorized"
    client.send({"type": "subscribe", "channel": "news", "token": bad})
    error = await client.next_of("error")
    assert (error["code"], error["channel"]) == ("unauthorized", "news")
    await nothing_more(client)
    # On an event stream: 401 JSON.
    response, _ = await open_stream(daemon, f"channel=private-a&token={bad}")
    assert response.code == 401
    assert json.loads(await response.content())["error"] == "unauthorized"


@pytest_twisted.ensureDeferred
async def test_fractional_times_and_small_skew_are_accepted(make_daemon):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1])
    fine = claims_token(exp=time.time() + 60.5, iat=time.time() + 2, nbf=time.time() + 1.5)
    client, frames = await first_frames(daemon, f"channel=private-a&token={fine}", 2)
    assert frames[1]["type"] == "subscribed"
    client.send({"type": "auth", "token": fine})
    assert isinstance((await client.next_of("authorized"))["exp"], int)


@pytest.mark.parametrize(
    "aud,ok",
    [("pushie", True), (["other", "pushie"], True), ("other", False), (None, False), (5, False)],
)
@pytest_twisted.ensureDeferred
async def test_token_audience(make_daemon, aud, ok):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1], token_audience=["pushie", "pushie-staging"])
    status, raw = await raw_handshake(daemon.port, f"/websocket?channel=private-a&token={claims_token(aud=aud)}")
    assert status == (101 if ok else 401)
    raw.transport.loseConnection()
    await raw.lost


@pytest.mark.parametrize(
    "claims,message",
    [
        ({"exp": NAN}, "'exp' must be a number"),
        ({"iat": INF}, "'iat' must be a number"),
        ({"iat": 1_800_000_010}, "issued in the future"),
        ({"nbf": 1_800_000_010}, "not valid yet"),
        ({"aud": "x"}, "no token_audience"),
    ],
)
def test_guard_names_the_refused_claim(claims, message):
    guard = make_guard()
    raw = jwt.encode({"sub": "u", "exp": 1_800_000_060, **claims}, SECRET_1, algorithm="HS256")
    with pytest.raises(PushieError, match=message) as refused:
        guard.verify_token(raw)
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")


TIMES = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-(10**30), 10**30)
    | st.sampled_from([1_800_000_000, 1_800_000_000.5, 1_800_000_100])
    | st.text(max_size=5)
    | st.booleans()
    | st.none()
)


@settings(max_examples=400)
@given(exp=TIMES, nbf=TIMES, iat=TIMES)
def test_time_claims_property(exp, nbf, iat):
    """A token is accepted exactly when its times are finite dates and now lies within them."""
    guard = make_guard()
    now = guard.clock.seconds()
    claims = {"sub": "u", "channels": ["private-a"], "exp": exp, "nbf": nbf, "iat": iat}
    raw = jwt.encode({k: v for k, v in claims.items() if v is not None}, SECRET_1, algorithm="HS256")

    def date(value):
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value <= 253402300799
        return ok and value == value  # NaN compares unequal

    expected = (
        date(exp)
        and exp >= now
        and (nbf is None or (date(nbf) and nbf <= now))
        and (iat is None or (date(iat) and iat <= now))
    )
    try:
        verified = guard.verify_token(raw)
    except PushieError as e:
        assert (e.status, e.code) == (401, "unauthorized")
        assert not expected
    else:
        assert expected and verified.exp == float(exp)


# -- A14: no app-id oracle on the Pusher HTTP API ------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_pusher_app_id_answers_like_a_wrong_key(make_daemon):
    daemon = await make_daemon(pusher_apps=APPS)
    body = {"name": "e", "channel": "c", "data": "{}"}
    raw = json.dumps(body).encode()
    answers = []
    for app_id in ("99", "4"):  # 4 exists, with another key; 99 does not
        path = f"/apps/{app_id}/events"
        answers.append(await api(daemon, "POST", path, body, signed_query("POST", path, raw)))
    assert answers[0] == answers[1]
    assert answers[0][0] == 401 and answers[0][1]["error"] == "unauthorized"
    # Unsigned, too.
    unsigned = [await api(daemon, "GET", f"/apps/{app_id}/channels", query="") for app_id in ("99", "3")]
    assert unsigned[0] == unsigned[1] and unsigned[0][0] == 401
    # The right key and signature for the right id still work.
    path = "/apps/3/events"
    assert (await api(daemon, "POST", path, body, signed_query("POST", path, raw, key=KEY)))[0] == 200


# -- pushie.js is told of a dropped channel -----------------------------------


@pytest_twisted.ensureDeferred
async def test_pushie_js_reports_a_channel_the_refresh_dropped(make_daemon):
    node = shutil.which("node")
    if node is None:
        if os.environ.get("PUSHIE_REQUIRE_NODE") == "1":
            pytest.fail("this test needs node (>= 20) and PUSHIE_REQUIRE_NODE=1 is set")
        pytest.skip("this test needs node (>= 20)")
    daemon = await make_daemon(subscriber_secrets=[SECRET_1])
    root = Path(__file__).resolve().parent
    out, err, code = await getProcessOutputAndValue(
        node,
        [
            "--experimental-websocket",
            str(root / "js" / "pushie_refresh.js"),
            str(root.parent / "pushie" / "static" / "pushie.js"),
            daemon.ws_url,
            token(channels=["private-a"]),
            token(channels=["private-b"]),
        ],
        env={"PATH": os.environ.get("PATH", "")},
    )
    reports = [json.loads(line) for line in out.decode().splitlines()]
    assert code == 0, (reports, err)
    seen = [(r["on"], r.get("frame", {}).get("type"), r.get("frame", {}).get("code")) for r in reports]
    assert ("subscription error", "unsubscribed", "forbidden") in seen, reports
    assert ("error", "unsubscribed", "forbidden") in seen, reports
