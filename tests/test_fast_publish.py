"""
The fast publish path (issue 15) gives what the general path gives, byte for
byte: the one-step check of the usual publication, the JSON scanner shortcut,
the one-formatting envelope and HTTP answer, the memory engine's synchronous
answer and its history kept as plain tuples.  Anything unusual takes the
general path, with its own errors.  No timing is asserted here (bench/ is
for that).
"""

from __future__ import annotations

import gc
import json
from types import MappingProxyType

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from pushie.doors import api
from pushie.doors._http import KNOWN_HEADER_BLOCKS, FastPublishRequest
from pushie.doors.api import _plain_request, is_json_content_type, parse_publish_body, result_json, write_json
from pushie.engines.memory import MemoryEngine
from pushie.errors import PushieError
from pushie.records import Publication, PublishRequest
from pushie.wire import InvalidJSON, envelope_parts, json_string, loads, message_envelope, text_frame
from tests.helpers import raw_connect, raw_websocket, wait_for

# Data that JSON decoding and encoding could get wrong: non-ASCII text (kept as
# UTF-8), escapes (in the body, and characters that must be escaped on the way
# out), numbers past 64 bits, floats at the edges, nesting, empty containers.
DATA = [
    b"null",
    b"true",
    b"0",
    b"-0.0",
    b"123456789012345678901234567890",
    b"-98765432109876543210",
    b"1.7976931348623157e308",
    b"5e-324",
    b"1E2",
    b"2.50",
    b'""',
    '"\u00e9\u4e2d\U0001f600"'.encode(),
    b'"\\u00e9\\u4e2d\\ud83d\\ude00"',
    b'"line\\nbreak \\"quoted\\" back\\\\slash \\t tab \\/ \\u0000 \\u001f"',
    '"\u2028\u2029"'.encode(),
    b"{}",
    b"[]",
    b'{"t": 1733000000000000000, "p": "xxxxxxxx"}',
    b'{"nested": [1, [2, [3, {"deep": [[[[["x"]]]]]}]]], "b": {"c": {"d": null}}}',
    b'{ "spaced" :\t[ 1 , 2 ]\n}',
    b'{"a": 1, "a": 2}',
    b'{"channel": "x", "data": 1}',
]


def _bodies(data: bytes) -> tuple[bytes, bytes]:
    """A usual body and one the one-step check leaves to the general checks (an explicit event)."""
    return (
        b'{"channel": "room-1", "data": %s}' % data,
        b'{"channel": "room-1", "data": %s, "event": "message"}' % data,
    )


@pytest.mark.parametrize("data", DATA)
def test_usual_publication_parses_as_the_general_checks(data):
    usual, general = _bodies(data)
    assert _plain_request(loads(usual)) is not None  # the fast check takes it
    assert _plain_request(loads(general)) is None  # ... and not this one
    fast = parse_publish_body(usual)
    slow = parse_publish_body(general)
    assert fast == slow
    assert fast[0][0].data == json.dumps(json.loads(data), separators=(",", ":"), ensure_ascii=False).encode()
    # In a batch, item by item, mixed with items that take the general checks.
    batch = b"[" + b",".join([usual, general, usual]) + b"]"
    requests, single = parse_publish_body(batch)
    assert not single and requests == [slow[0][0]] * 3


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b'{"channel": "bad name!", "data": 1}', "invalid_channel", "a channel name"),
        (b'{"channel": 5, "data": 1}', "invalid_channel", "a channel name"),
        (b'{"channel": "a", "data": 1e999}', "invalid_json", "too large"),
        (b'{"channel": "a", "data": "\\ud800"}', "invalid_json", "surrogate"),
        (b'{"Channel": "a", "data": 1}', None, None),  # folded: published
        (b'{"channel": "a", "Data": 1}', None, None),
        (b'{"channel": "a", "dat": 1}', "unknown_field", "dat"),
        (b'{"channels": ["a"], "data": 1}', None, None),
        (b'{"channel": "a", "channels": 1}', "invalid_body", "not both"),
        (b'{"channel": "a"}', "missing_data", "data"),
        (b'[{"channel": "a", "data": 1}, {"channel": "b"}]', "missing_data", "publication 1"),
        (b'[{"channel": "a", "data": 1}, {"channel": "b b", "data": 1}]', "invalid_channel", "a channel name"),
        (b'[{"channel": "a", "data": 1}, 7]', "invalid_batch", "publication 1"),
    ],
)
def test_unusual_publications_take_the_general_checks(body, code, message):
    if code is None:
        requests, _ = parse_publish_body(body)
        assert [r.channel for r in requests] == ["a"]
        return
    with pytest.raises(PushieError) as caught:
        parse_publish_body(body)
    assert caught.value.code == code
    assert message in caught.value.message


# Each with what loads() answered before the shortcut existed.
TEXTS = [
    (b'{"a": 1}', ("value", {"a": 1})),
    (b'[1, 2, {"b": [3]}]', ("value", [1, 2, {"b": [3]}])),
    (b'{"a": 1}  ', ("value", {"a": 1})),
    (b'  {"a": 1}', ("value", {"a": 1})),
    (b"{}", ("value", {})),
    (b"[]", ("value", [])),
    (b'{"a": 1}}', ("error", "Extra data at character 8")),
    (b'{"a": 1} x', ("error", "Extra data at character 9")),
    (b"[1,]", ("error", "Expecting value at character 3")),
    (b"[[1,]]", ("error", "Expecting value at character 4")),
    (b'{"a": [}', ("error", "Expecting value at character 7")),
    (b'{"a": 1, }', ("error", "Expecting property name enclosed in double quotes at character 9")),
    (b'{"a" 1}', ("error", "Expecting ':' delimiter at character 5")),
    (b"[", ("error", "Expecting value at character 1")),
    (b"]", ("error", "Expecting value at character 0")),
    (b"", ("error", "Expecting value at character 0")),
    (b"[1e999]", ("error", "the number 1e999 is too large for a 64-bit float (RFC 8259 interoperability)")),
    (b"[NaN]", ("error", "NaN is not JSON (RFC 8259 has no NaN or Infinity)")),
    (b'["\\\\ud800"]', ("value", ["\\ud800"])),
    (b'["\\ud800"]', ("error", "a string holds a lone UTF-16 surrogate (such as \\ud800); it is not Unicode text")),
    (b"[" * 70 + b"]" * 70, ("error", "arrays and objects nest deeper than 64 levels")),
]


@pytest.mark.parametrize(("text", "expected"), TEXTS)
def test_loads_shortcut_matches_the_decoder(text, expected):
    """
    The scanner shortcut (a body with no surrounding white space) gives the
    value or the error that the decoder gives, whether the text comes as
    bytes or as str.
    """

    def outcome(raw):
        try:
            return ("value", loads(raw))
        except InvalidJSON as e:
            return ("error", str(e))

    assert outcome(text) == expected
    assert outcome(text.decode()) == expected


def test_loads_still_detects_utf16_and_utf32_bodies():
    for encoding in ("utf-16-le", "utf-16-be", "utf-16", "utf-32", "utf-32-le"):
        assert loads('{"a": "\u00e9"}'.encode(encoding)) == {"a": "\u00e9"}
        assert loads('["\u00e9"]'.encode(encoding)) == ["\u00e9"]
    assert loads('\ufeff{"a": 1}'.encode()) == {"a": 1}  # UTF-8 with a BOM, as before


@pytest.mark.parametrize("channel", ["a", "room-1_x=y@z,w.v;u:t", "with space", "#hash", "\u00e9", 'q"uote'])
@pytest.mark.parametrize("event", ["message", "other", "m\u00e9"])
@pytest.mark.parametrize("user_id", [None, "u-1"])
@pytest.mark.parametrize("epoch", ["AbC-_09", 'odd"epoch'])
def test_envelope_is_the_one_envelope_parts_writes(channel, event, user_id, epoch):
    data = b'{"x":[1,"%s"]}'
    head, middle, tail = envelope_parts(channel, event, data, user_id)
    expected = head + b"%d" % 42 + middle + json_string(epoch) + tail
    envelope = message_envelope(channel, event, 42, epoch, data, user_id)
    assert envelope == expected
    fields = json.loads(envelope)
    assert fields["channel"] == channel and fields["epoch"] == epoch and fields["data"] == {"x": [1, "%s"]}


def test_result_json_is_dumps_of_the_result():
    for channel, epoch in (("a", "e"), ("\u00e9 x", 'q"')):
        publication = Publication(channel, 12345678901234, epoch, b"1")
        assert result_json(publication) == json.dumps(
            api.result_of(publication), separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")


class _Channel:
    """What a FastPublishRequest needs of its HTTP channel: whether it stays open, and where answers go."""

    def __init__(self, persistent: bool) -> None:
        self.persistent = persistent
        self.written: list[bytes] = []

    def _fast_finished(self, request, data: bytes) -> None:
        self.written.append(data)


@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("status", [200, 400, 503, 299])
def test_one_formatting_answer_is_the_general_answer(persistent, status):
    body = '{"channel":"\u00e9","offset":1}'.encode()
    fast_channel, general_channel = _Channel(persistent), _Channel(persistent)
    fast = FastPublishRequest(fast_channel, {}, b"")  # type: ignore[arg-type]
    general = FastPublishRequest(general_channel, {}, b"")  # type: ignore[arg-type]
    general.responseHeaders  # noqa: B018  (headers begun: the general way)
    write_json(fast, status, body)
    write_json(general, status, body)
    assert fast_channel.written == general_channel.written
    assert len(fast_channel.written) == 1 and fast_channel.written[0].endswith(b"\r\n\r\n" + body)
    assert (b"Connection: close\r\n" in fast_channel.written[0]) is not persistent
    assert fast.finished and fast.code == status
    # Extra headers (a 401's WWW-Authenticate, a 503's Retry-After) take the general way.
    with_headers = _Channel(persistent)
    write_json(FastPublishRequest(with_headers, {}, b""), status, body, {"Retry-After": "1"})  # type: ignore[arg-type]
    assert b"\r\nRetry-After: 1\r\n" in with_headers.written[0]


def test_an_answer_to_a_client_gone_is_not_written():
    channel = _Channel(True)
    request = FastPublishRequest(channel, {}, b"")  # type: ignore[arg-type]
    request._disconnected = True
    write_json(request, 200, b"{}")
    assert channel.written == []


def test_content_type_answers_are_remembered_within_bounds():
    values = [
        b"application/json",
        b"Application/JSON; charset=UTF-8",
        b"text/plain",
        b"application/json;charset=latin-1",
    ]
    first = [is_json_content_type(v) for v in values]
    assert first == [True, True, False, False]
    assert [is_json_content_type(v) for v in values] == first
    for i in range(200):
        assert not is_json_content_type(b"text/x-%d" % i)
    assert len(api._content_types) <= 64


def _engine(**kwargs) -> tuple[MemoryEngine, list[Publication]]:
    dispatched: list[Publication] = []

    class Listener:
        def dispatch(self, publication: Publication) -> None:
            dispatched.append(publication)

        def presence_changed(self, event: object) -> None:
            pass

    engine = MemoryEngine(clock=Clock(), **kwargs)
    engine.start(Listener())  # type: ignore[arg-type]
    return engine, dispatched


def test_append_now_answers_as_append():
    sync, sync_dispatched = _engine()
    deferred, deferred_dispatched = _engine()
    requests = [
        PublishRequest("a", b"1"),
        PublishRequest("b", b"2", "other", "key-1", "user-1"),
        PublishRequest("a", b"3"),
        PublishRequest("b", b"2", "other", "key-1", "user-1"),  # a repeat: the first one's place
    ]
    now = sync.append_now(requests)
    later = deferred.append(requests).result

    def fields(publications):
        return [(p.channel, p.offset, p.data, p.event, p.user_id) for p in publications]

    assert (
        fields(now)
        == fields(later)
        == [
            ("a", 1, b"1", "message", None),
            ("b", 1, b"2", "other", "user-1"),
            ("a", 2, b"3", "message", None),
            ("b", 1, b"2", "other", "user-1"),
        ]
    )
    assert fields(sync_dispatched) == fields(deferred_dispatched) == fields(now[:3])
    assert sync.used == deferred.used > 0


def test_history_is_kept_as_plain_tuples_and_read_back_whole():
    engine, dispatched = _engine()
    meta = MappingProxyType({"exclude": "socket-1"})
    engine.append_now(
        [
            PublishRequest("c", b'{"a":"\xc3\xa9"}'),
            PublishRequest("c", b"2", "ev", None, "user-1"),
            PublishRequest("c", b"3", meta=meta),
        ]
    )
    kept = engine.history("c", 0, None).result.publications
    assert [(p.channel, p.offset, p.epoch, p.data, p.event, p.user_id, p.meta) for p in kept] == [
        (p.channel, p.offset, p.epoch, p.data, p.event, p.user_id, p.meta) for p in dispatched
    ]
    assert [p.envelope for p in kept] == [
        message_envelope(p.channel, p.event, p.offset, p.epoch, p.data, p.user_id) for p in dispatched
    ]
    assert [p.websocket_frame for p in kept] == [p.websocket_frame for p in dispatched]
    assert [p.offset for p in engine.history("c", 1, None).result.publications] == [2, 3]
    # The garbage collector stops following the entries without metadata.
    gc.collect()
    history = engine._channels["c"].history
    assert history is not None
    assert [gc.is_tracked(entry) for entry in history] == [False, False, True]


@pytest_twisted.ensureDeferred
async def test_the_hub_answers_at_once_only_on_the_memory_engine(make_daemon, engine):
    daemon = await make_daemon()
    now = daemon.hub.publish_now([PublishRequest("a", b"1")])
    if engine == "memory":
        assert now is not None and [p.offset for p in now] == [1]
    else:
        assert now is None
    status, body, _ = await daemon.publish({"channel": "a", "data": 2})
    assert status == 200 and body["offset"] == (2 if engine == "memory" else 1)


def _post(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


@pytest_twisted.ensureDeferred
async def test_header_blocks_read_once_answer_as_before(make_daemon):
    """
    The short path keeps its reading of the header blocks it has seen: the
    same block again is answered the same way, a block it would not take
    (a body over the limit) is never kept, and it keeps a bounded number.
    """
    daemon = await make_daemon(max_message_size=64)
    known = daemon.service.site.publish_header_blocks
    client = await raw_connect(daemon.port)
    body = b'{"channel": "a", "data": 1}'
    client.transport.write(_post(body) + _post(body) + _post(b'{"channel": "b", "data": 2}'))
    await wait_for(lambda: client.received.count(b"HTTP/1.1 200 OK") == 3)
    assert b'{"channel":"a","offset":2,' in client.received and b'{"channel":"b","offset":1,' in client.received
    block = b"Host: x\r\nContent-Type: application/json\r\nContent-Length: %d" % len(body)
    assert known[block] == ({b"host": b"x", b"content-type": b"application/json", b"content-length": b"27"}, 27, True)
    # Over the limit: twisted.web's 413, never kept.
    big = b'{"channel": "a", "data": "' + b"x" * 100 + b'"}'
    too_large = await raw_connect(daemon.port)
    too_large.transport.write(_post(big))
    await wait_for(lambda: b"HTTP/1.1 413 " in too_large.received)
    assert not any(b"Content-Length: %d" % len(big) in block for block in known)
    # Many different blocks: every one answered, at most KNOWN_HEADER_BLOCKS kept.
    many = await raw_connect(daemon.port)
    many.transport.write(b"".join(_post(body, b"X-N: %d\r\n" % i) for i in range(KNOWN_HEADER_BLOCKS + 50)))
    await wait_for(lambda: many.received.count(b"HTTP/1.1 200 OK") == KNOWN_HEADER_BLOCKS + 50, timeout=20)
    assert 0 < len(known) <= KNOWN_HEADER_BLOCKS
    last = b"Host: x\r\nContent-Type: application/json\r\nX-N: %d\r\nContent-Length: %d" % (
        KNOWN_HEADER_BLOCKS + 49,
        len(body),
    )
    assert last in known  # the newest are kept, not the first ones for good
    for c in (client, too_large, many):
        c.transport.loseConnection()


# -- batches of the usual shape, in one pass (plain_batch, append_plain) ------


@pytest.mark.parametrize("data", DATA)
def test_plain_batch_is_what_the_general_checks_give(data):
    usual, general = _bodies(data)
    other = b'{"channel": "room-2", "data": %s}' % data
    body = b"[" + b",".join([usual, other, usual]) + b"]"
    items = api.plain_batch(loads(body))
    requests, single = parse_publish_body(body)
    assert not single
    assert items == [(r.channel, r.data) for r in requests]
    assert requests == [PublishRequest(c, d, "message", None) for c, d in items]  # ... and nothing else
    # One item of another shape: the whole batch takes the general checks.
    assert api.plain_batch(loads(b"[" + b",".join([usual, general]) + b"]")) is None


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"[" + b",".join([b'{"channel": "c%d", "data": 1}' % i for i in range(101)]) + b"]",
        b'[{"channel": "a", "data": 1}, 5]',
        b'[{"channel": "a", "data": 1}, {"channel": "#bad", "data": 2}]',
        b'[{"channel": "a", "data": 1}, {"channel": 7, "data": 2}]',
        b'[{"channel": "a", "data": 1}, {"Channel": "b", "data": 2}]',
        b'[{"channel": "a", "data": 1}, {"channel": "b", "Data": 2}]',
        b'[{"channel": "a", "data": 1}, {"channel": "b"}]',
        b'[{"channel": "a", "data": 1}, {"channels": ["b"], "data": 2}]',
        b'{"channel": "a", "data": 1}',
    ],
)
def test_plain_batch_leaves_everything_else_to_the_general_checks(body):
    assert api.plain_batch(loads(body)) is None


def _plain_engines(monkeypatch, **kwargs):
    """Two memory engines whose epochs are the same sequence: one for each path."""
    from pushie.engines import memory

    def epochs():
        n = 0
        while True:
            n += 1
            yield f"epoch-{n}"

    sequences = [epochs(), epochs()]
    current = [0]
    monkeypatch.setattr(memory, "new_epoch", lambda: next(sequences[current[0]]))
    general, general_dispatched = _engine(**kwargs)
    plain, plain_dispatched = _engine(**kwargs)

    def use(which: int) -> None:
        current[0] = which

    return (general, general_dispatched), (plain, plain_dispatched), use


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"history_size": 2},
        {"history_size": 0},
        {"memory_budget": 5000},  # evicts the oldest history as batches arrive
    ],
)
def test_append_plain_is_append_now(monkeypatch, settings):
    (general, general_dispatched), (plain, plain_dispatched), use = _plain_engines(monkeypatch, **settings)
    datas = [b"1", b'{"t":1,"p":"xxxx"}', '"\u00e9"'.encode(), b"null", b"[1,[2]]"]
    batches = [
        [("a", datas[0]), ("b", datas[1]), ("a", datas[2])],  # a channel twice in a batch
        [(f"c-{i}", datas[i % len(datas)]) for i in range(40)],
        [("a", datas[3]), ("b", datas[4]), ("a", datas[0]), ("a", datas[1])],
    ]
    for batch in batches:
        use(0)
        expected = general.append_now([PublishRequest(c, d, "message", None) for c, d in batch])
        use(1)
        got = plain.append_plain(batch)

        def fields(publications):
            return [
                (p.channel, p.offset, p.epoch, p.data, p.event, p.user_id, p.meta, p.envelope, p.websocket_frame)
                for p in publications
            ]

        assert fields(got) == fields(expected)
        assert fields(plain_dispatched) == fields(general_dispatched)
        assert [p.envelope for p in got] == [
            message_envelope(p.channel, p.event, p.offset, p.epoch, p.data, p.user_id) for p in got
        ]
        # History, accounting, age order and budget: the same.
        assert plain.used == general.used
        assert plain._kept == general._kept
        assert plain.evicted == general.evicted
        assert sorted(plain._channels) == sorted(general._channels)
        for name in {c for c, _ in batch}:
            use(0)
            expected_history = general.history(name, 0, None).result
            use(1)
            history = plain.history(name, 0, None).result
            assert fields(history.publications) == fields(expected_history.publications)
            assert (history.state, history.complete) == (expected_history.state, expected_history.complete)
    if settings.get("memory_budget"):
        assert general.evicted > 0  # the budget did evict on both paths


@pytest.mark.parametrize("epoch", ["AbC-_09", 'odd"epoch', "\u00e9"])
@pytest.mark.parametrize("channel", ["a", "room-1_x=y@z,w.v;u:t", "\u00e9 x", 'q"uote'])
def test_results_json_is_the_general_answer(channel, epoch):
    publications = [
        Publication("plain", 1, "e-1", b"1"),
        Publication(channel, 12345678901234, epoch, b"2"),
        Publication("plain", 2, "e-1", b"3"),
    ]
    for some in (publications, publications[:1], publications[1:2], []):
        expected = b'{"results":[' + b",".join([result_json(p) for p in some]) + b"]}"
        assert api.results_json(some) == expected
        assert json.loads(api.results_json(some)) == {"results": [api.result_of(p) for p in some]}


@pytest_twisted.ensureDeferred
async def test_a_usual_batch_answers_and_delivers_as_the_general_path(make_daemon, engine):
    """
    Over HTTP and WebSocket, on both engines: a batch of the usual shape (in
    one pass on the memory engine) and the same batch with an explicit event
    on every item (the general path) give the same answers and the same
    frames, byte for byte, at the next offsets.
    """
    daemon = await make_daemon()
    names = ["pa", "pb", "pc"]
    sockets = {}
    for name in names:
        sockets[name] = await raw_websocket(daemon.port, "/websocket?channel=" + name)
        await wait_for(lambda s=sockets[name]: b'"subscribed"' in s.received, timeout=30)
        sockets[name].received = b""
    datas = [b'{"t":1,"p":"xx"}', '"\u00e9\\n"'.encode(), b"[1,2.5,null]"]
    items = [(names[0], datas[0]), (names[1], datas[1]), (names[0], datas[2]), (names[2], datas[0])]
    usual = b"[" + b",".join([b'{"channel":"%s","data":%s}' % (c.encode(), d) for c, d in items]) + b"]"
    general = b"[" + b",".join([b'{"channel":"%s","event":"message","data":%s}' % (c.encode(), d) for c, d in items])
    general += b"]"
    assert api.plain_batch(loads(usual)) is not None and api.plain_batch(loads(general)) is None
    answers, frames = [], []
    for body in (usual, general):
        client = await raw_connect(daemon.port)
        client.transport.write(_post(body))
        await wait_for(lambda c=client: c.received.endswith(b"]}"), timeout=30)
        answers.append(client.received.partition(b"\r\n\r\n"))
        client.transport.loseConnection()
        counts = {name: sum(1 for c, _ in items if c == name) for name in names}
        await wait_for(
            lambda counts=counts: all(sockets[n].received.count(b'"type":"message"') == counts[n] for n in names),
            timeout=30,
        )
        frames.append({n: sockets[n].received for n in names})
        for n in names:
            sockets[n].received = b""
    assert answers[0][0] == answers[1][0]  # the same status line and headers
    for (_, _, body), sent, base in zip(answers, frames, (0, 1), strict=True):
        results = json.loads(body)["results"]
        assert [r["channel"] for r in results] == [c for c, _ in items]
        # The first message of channel pa is at offset 1, then 2; in the second batch 3, then 4.
        assert [r["offset"] for r in results] == [1 + 2 * base, 1 + base, 2 + 2 * base, 1 + base]
        publications = [
            Publication(r["channel"], r["offset"], r["epoch"], d) for r, (_, d) in zip(results, items, strict=True)
        ]
        assert body == b'{"results":[' + b",".join([result_json(p) for p in publications]) + b"]}"
        for name in names:
            assert sent[name] == b"".join(
                [
                    text_frame(message_envelope(p.channel, "message", p.offset, p.epoch, p.data))
                    for p in publications
                    if p.channel == name
                ]
            )
    for client in sockets.values():
        client.transport.loseConnection()


# -- review of the fast paths: floats that overflow without a 3-digit exponent --

# A float overflows when its integer digits and its exponent together pass
# 308, whatever the exponent's length: a long mantissa with a short exponent
# overflows as surely as 1e999.
OVERFLOWING = [
    b"1" + b"0" * 250 + b"e99",
    b"9" * 308 + b"e1",
    b"-" + b"2" * 300 + b".5e+9",
    b"1" + b"0" * 300 + b".0E10",
]


@pytest.mark.parametrize("number", OVERFLOWING)
def test_loads_refuses_every_float_that_overflows(number):
    with pytest.raises(InvalidJSON, match="too large for a 64-bit float"):
        loads(b'{"channel":"a","data":%s}' % number)
    with pytest.raises(InvalidJSON, match="too large for a 64-bit float"):
        loads(b"[1, %s]" % number)


def test_loads_keeps_long_floats_that_do_not_overflow():
    for number in (b"1" * 209 + b"e99", b"1" * 308 + b".5", b"0." + b"1" * 400 + b"e99", b"1" * 308 + b"e-9"):
        value = loads(b"[%s]" % number)
        assert value == [float(number)] and value[0] - value[0] == 0.0


@pytest.mark.parametrize("number", OVERFLOWING)
@pytest_twisted.ensureDeferred
async def test_a_float_that_overflows_publishes_nothing(make_daemon, number):
    daemon = await make_daemon()
    single = b'{"channel":"ov","data":%s}' % number
    batch = b'[{"channel":"ov","data":1},{"channel":"ov","data":%s}]' % number
    for body in (single, batch):
        status, answer, _ = await daemon.publish(None, raw=body)
        assert status == 400, answer
        assert answer["error"] == "invalid_json" and "too large" in answer["message"]
    state = await daemon.hub.state("ov")
    assert state.offset == 0  # nothing published, no Infinity sent on


@pytest_twisted.ensureDeferred
async def test_header_blocks_are_still_kept_after_many_different_ones(make_daemon):
    """
    Header blocks differ with every body length: a publisher whose messages
    vary in size fills the cache in a few hundred requests.  Blocks seen
    after that are kept all the same (the cache starts afresh), so a steady
    publisher is not shut out of it for the daemon's lifetime.
    """
    daemon = await make_daemon()
    known = daemon.service.site.publish_header_blocks
    varied = await raw_connect(daemon.port)
    bodies = [b'{"channel": "a", "data": "%s"}' % (b"x" * n) for n in range(KNOWN_HEADER_BLOCKS + 20)]
    varied.transport.write(b"".join(_post(body) for body in bodies))
    await wait_for(lambda: varied.received.count(b"HTTP/1.1 200 OK") == len(bodies), timeout=20)
    assert 0 < len(known) <= KNOWN_HEADER_BLOCKS
    steady = await raw_connect(daemon.port)
    body = b'{"channel": "b", "data": 1}'
    steady.transport.write(_post(body, b"Authorization: Bearer steady\r\n"))
    await wait_for(lambda: b"HTTP/1.1 200 OK" in steady.received)
    block = b"Host: x\r\nContent-Type: application/json\r\nAuthorization: Bearer steady\r\nContent-Length: %d" % len(
        body
    )
    assert block in known
    assert len(known) <= KNOWN_HEADER_BLOCKS
    for client in (varied, steady):
        client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_field_given_twice_in_one_spelling_keeps_its_last_value(make_daemon):
    """
    {"channel": "a", "data": 1, "data": 2}: the last value counts, on the
    one-step path and the general one (an event forces it), single or batch,
    as docs/PROTOCOL.md §3.2 says.
    """
    daemon = await make_daemon()
    bodies = [
        b'{"channel":"dup","data":1,"data":2}',
        b'{"channel":"dup","data":1,"event":"message","data":2}',
        b'[{"channel":"dup","data":1,"data":2},{"channel":"nope","channel":"dup","data":2}]',
    ]
    for body in bodies:
        status, answer, _ = await daemon.publish(None, raw=body)
        assert status == 200, answer
    history = await daemon.hub.history("dup", 0, None)
    assert [p.data for p in history.publications] == [b"2"] * 4
    assert (await daemon.hub.state("nope")).offset == 0
