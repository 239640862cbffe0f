"""Pure parts, tested without a network: names, envelopes, frames, the engine, the throttle."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent

from pushie.channels import is_valid_channel
from pushie.doors.api import is_json_content_type, parse_publish_body
from pushie.errors import PushieError
from pushie.logs import Throttle
from pushie.records import Publication


@pytest.mark.parametrize("name", ["a", "bunno", "A-Z_0-9=@,.;:", "x" * 164, "private-chat", "presence-room:1"])
def test_valid_channel_names(name):
    assert is_valid_channel(name)


@pytest.mark.parametrize("name", ["", "x" * 165, "a b", "a/b", "é", "a\n", None, 5, ["a"], "a*"])
def test_invalid_channel_names(name):
    assert not is_valid_channel(name)


@given(st.text(max_size=200))
def test_channel_rule_matches_the_protocol(name):
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-=@,.;:")
    assert is_valid_channel(name) == (1 <= len(name) <= 164 and set(name) <= allowed)


def test_envelope_is_built_once_and_is_exact():
    publication = Publication("c", 18, "ep", b'{"x":"\xc3\xa9"}', "news")
    envelope = publication.envelope
    assert publication.envelope is envelope
    assert json.loads(envelope) == {
        "type": "message",
        "channel": "c",
        "event": "news",
        "offset": 18,
        "epoch": "ep",
        "data": {"x": "é"},
    }


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 100_000])
def test_websocket_frame_encodes_every_length(size):
    data = json.dumps("x" * size).encode()
    publication = Publication("c", 1, "e", data)
    frame = publication.websocket_frame
    assert publication.websocket_frame is frame
    payload = publication.envelope
    assert frame[0] == 0x81  # FIN + text
    length = frame[1] & 0x7F
    assert frame[1] & 0x80 == 0  # server frames are not masked
    if length == 126:
        (length,), header = struct.unpack("!H", frame[2:4]), 4
    elif length == 127:
        (length,), header = struct.unpack("!Q", frame[2:10]), 10
    else:
        header = 2
    assert length == len(payload) and frame[header:] == payload


@pytest.mark.parametrize(
    "value,ok",
    [
        (b"application/json", True),
        (b"Application/JSON", True),
        (b"application/json; charset=utf-8", True),
        (b'application/json;charset="UTF-8"', True),
        (b"application/json; charset=iso-8859-1", False),
        (b"text/json", False),
        (None, False),
    ],
)
def test_json_content_type(value, ok):
    assert is_json_content_type(value) is ok


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_parse_publish_body_never_crashes(body):
    try:
        requests, single = parse_publish_body(body)
    except PushieError as e:
        assert e.status == 400 and e.code and e.message
    else:
        assert 1 <= len(requests) <= 100
        assert all(is_valid_channel(r.channel) for r in requests)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@given(JSON_VALUES)
def test_published_data_round_trips(value):
    (request,), single = parse_publish_body(json.dumps({"channel": "c", "data": value}).encode())
    assert single
    assert json.loads(Publication("c", 1, "e", request.data).envelope)["data"] == value


def test_throttle_logs_the_first_and_counts_the_rest():
    clock = Clock()
    events = []
    log = Logger(observer=events.append)
    throttle = Throttle(log, clock, interval=10)
    for _ in range(5):
        throttle.warn("bad", "bad request from {peer}", peer="p")
    assert len(events) == 1 and events[0]["log_level"] == LogLevel.warn
    assert formatEvent(events[0]) == "bad request from p"
    throttle.warn("other", "another kind")
    assert len(events) == 2
    clock.advance(10)
    throttle.warn("bad", "bad request from {peer}", peer="p")
    assert len(events) == 3 and events[2]["suppressed"] == 4


# -- the hand-built encodings equal the library ones ------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_equals_autobahns_prepared_frame(size):
    from autobahn.websocket.protocol import PreparedMessage

    from pushie.wire import text_frame

    payload = b"x" * size
    expected = PreparedMessage(payload, isBinary=False, applyMask=False, doNotCompress=True).payloadHybi
    assert text_frame(payload) == expected


@given(st.text(max_size=50) | st.sampled_from(["message", "c-1_2=@,.;:", "a b", 'q"', "back\\slash", "é", "\x00"]))
def test_json_string_equals_dumps(text):
    from pushie.wire import dumps, json_string

    assert json_string(text) == dumps(text) == json.dumps(text, separators=(",", ":"), ensure_ascii=False).encode()


@given(st.text(max_size=20), st.integers(0, 2**63), st.text(max_size=20), st.text(min_size=1, max_size=20))
def test_hand_built_envelope_and_answer_equal_dumps(channel, offset, epoch, event):
    from pushie.doors.api import result_json, result_of
    from pushie.wire import dumps

    publication = Publication(channel, offset, epoch, b"[1]", event)
    assert result_json(publication) == dumps(result_of(publication))
    expected = {"type": "message", "channel": channel, "event": event, "offset": offset, "epoch": epoch, "data": [1]}
    assert publication.envelope == dumps(expected)


@given(JSON_VALUES)
def test_dumps_equals_json_dumps(value):
    from pushie.wire import dumps

    assert dumps(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
