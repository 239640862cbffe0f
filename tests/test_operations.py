"""Operations: /metrics, --metrics-listen, and every limit with its answer."""

from __future__ import annotations

import json

import pytest_twisted
import treq

from tests.helpers import raw_handshake, wait_for
from tests.test_auth import KEY_A, KEY_B


def metric(text: str, name: str) -> float:
    """The value of one sample line (name with labels, exactly) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics:\n{text}")


@pytest_twisted.ensureDeferred
async def test_metrics_count_what_happens(daemon):
    clients = []
    for _ in range(3):
        client = await daemon.connect("channel=m")
        await client.next_of("welcome")
        await client.next_of("subscribed")
        clients.append(client)
    await daemon.publish([{"channel": "m", "data": i} for i in range(4)])
    for client in clients:
        for _ in range(4):
            await client.next_of("message")
    await daemon.publish({"channel": "bad name", "data": 1})
    status, body, response = await daemon.get("/metrics")
    assert status == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain; version=")
    text = body.decode()
    assert metric(text, "pushie_connections") == 3
    assert metric(text, "pushie_subscriptions") == 3
    assert metric(text, "pushie_channels") == 1
    assert metric(text, "pushie_publications_total") == 4
    assert metric(text, "pushie_deliveries_total") == 12
    assert metric(text, 'pushie_rejected_requests_total{reason="invalid_channel"}') == 1
    assert metric(text, "pushie_publish_seconds_count") == 1
    for name in ("pushie_slow_consumer_disconnects_total", "pushie_engine_errors_total"):
        assert metric(text, name) == 0


@pytest_twisted.ensureDeferred
async def test_metrics_on_their_own_endpoint(make_daemon):
    daemon = await make_daemon(metrics_listen="tcp:0:interface=127.0.0.1")
    status, body, _ = await daemon.get("/metrics")
    assert status == 404
    port = daemon.service.listeners[-1].port.getHost().port
    response = await treq.get(f"http://127.0.0.1:{port}/metrics", pool=daemon.pool)
    assert response.code == 200
    assert b"pushie_connections" in await response.content()


def _lines(events: list) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(event) for event in events]


@pytest_twisted.ensureDeferred
async def test_the_log_names_the_metrics_endpoint(make_daemon, log_events):
    """Issue 17: an operator reading the log must tell the --metrics-listen endpoint from the main ones."""
    daemon = await make_daemon(metrics_listen="tcp:0:interface=127.0.0.1")
    port = daemon.service.listeners[-1].port.getHost().port
    lines = _lines(log_events)
    starting = [line for line in lines if "starting" in line]
    assert starting and "metrics endpoint tcp:0:interface=127.0.0.1 (/metrics only)" in starting[0], starting
    metrics_lines = [line for line in lines if f":{port})" in line]
    assert metrics_lines == [
        f"Metrics endpoint (/metrics only) listening on tcp:0:interface=127.0.0.1 (127.0.0.1:{port})"
    ]
    main = [line for line in lines if line.startswith("Pushie listening on")]
    assert main and all(f":{port})" not in line for line in main)


@pytest_twisted.ensureDeferred
async def test_non_numeric_pusher_app_ids_are_warned_about(make_daemon, log_events):
    """Issue 17: the Python pusher SDK refuses an app_id that is not digits; the start-up log says so."""
    await make_daemon(pusher_apps=["app-id:app-key:0123456789abcdef", "424242:other-key:0123456789abcdef"])
    warnings = [line for line in _lines(log_events) if "not numeric" in line]
    assert warnings == [
        "Pusher app ids app-id are not numeric: the Python pusher SDK accepts only "
        "numeric app ids (as Pusher issues them); use digits, e.g. 123456"
    ]


@pytest_twisted.ensureDeferred
async def test_numeric_pusher_app_ids_get_no_warning(make_daemon, log_events):
    await make_daemon(pusher_apps=["424242:app-key:0123456789abcdef"])
    assert not [line for line in _lines(log_events) if "not numeric" in line]


@pytest_twisted.ensureDeferred
async def test_publish_rate_per_key(make_daemon):
    daemon = await make_daemon(publish_rate=2, publisher_keys=[KEY_A, KEY_B])
    a = {"Authorization": f"Bearer {KEY_A}"}
    answers = [await daemon.publish({"channel": "r", "data": i}, headers=a) for i in range(3)]
    assert [s for s, _, _ in answers] == [200, 200, 429]
    status, body, response = answers[2]
    assert body["error"] == "rate_limited" and response.headers.getRawHeaders("retry-after") == ["1"]
    # Another key has its own budget; nothing of the refused request was published.
    status, body, _ = await daemon.publish({"channel": "r", "data": "b"}, headers={"Authorization": f"Bearer {KEY_B}"})
    assert (status, body["offset"]) == (200, 3)


@pytest_twisted.ensureDeferred
async def test_open_publishing_is_limited_per_address(make_daemon):
    daemon = await make_daemon(publish_rate=1)
    assert (await daemon.publish({"channel": "r", "data": 1}))[0] == 200
    assert (await daemon.publish({"channel": "r", "data": 2}))[0] == 429


@pytest_twisted.ensureDeferred
async def test_max_connections(make_daemon):
    daemon = await make_daemon(max_connections=2)
    first = await daemon.connect()
    await first.next_of("welcome")
    response = await treq.get(daemon.url + "/events?channel=a", pool=daemon.pool, unbuffered=True)
    assert response.code == 200
    await wait_for(lambda: len(daemon.hub.connections) == 2)
    status, client = await raw_handshake(daemon.port, "/websocket")
    assert status == 503
    await client.lost
    refused = await treq.get(daemon.url + "/events?channel=a", pool=daemon.pool)
    assert refused.code == 503
    assert json.loads(await refused.content())["error"] == "too_many_connections"
    first.close()
    await first.closed
    await wait_for(lambda: len(daemon.hub.connections) == 1)
    again = await daemon.connect()  # room again
    await again.next_of("welcome")
    response.original._transport.stopProducing()


@pytest_twisted.ensureDeferred
async def test_max_connections_per_address(make_daemon):
    daemon = await make_daemon(max_connections_per_ip=1)
    first = await daemon.connect()
    await first.next_of("welcome")
    status, client = await raw_handshake(daemon.port, "/websocket")
    assert status == 429
    await client.lost


@pytest_twisted.ensureDeferred
async def test_max_subscriptions(make_daemon):
    daemon = await make_daemon(max_subscriptions=2)
    status, client = await raw_handshake(daemon.port, "/websocket?channel=a&channel=b&channel=c")
    assert status == 400
    await client.lost
    ws = await daemon.connect("channel=a&channel=b")
    await ws.next_of("welcome")
    await ws.next_of("subscribed")
    await ws.next_of("subscribed")
    ws.send({"type": "subscribe", "channel": "c"})
    error = await ws.next_of("error")
    assert (error["code"], error["channel"]) == ("too_many_subscriptions", "c")
    ws.send({"type": "unsubscribe", "channel": "a"})
    await ws.next_of("unsubscribed")
    ws.send({"type": "subscribe", "channel": "c"})
    assert (await ws.next_of("subscribed"))["channel"] == "c"
    refused = await treq.get(daemon.url + "/events?channel=a&channel=b&channel=c", pool=daemon.pool)
    assert refused.code == 400
    assert json.loads(await refused.content())["error"] == "too_many_subscriptions"


@pytest_twisted.ensureDeferred
async def test_slow_consumer_is_dropped_and_others_keep_up(make_daemon):
    daemon = await make_daemon(slow_consumer_buffer=300 * 1024, slow_consumer_grace=30)
    status, slow = await raw_handshake(daemon.port, "/websocket?channel=flood")
    assert status == 101
    slow.transport.pauseProducing()  # it stops reading
    fast = await daemon.connect("channel=flood")
    await fast.next_of("welcome")
    await fast.next_of("subscribed")
    payload = "x" * 30_000
    sent = 0
    # (The slow client does not read, so it would not notice the drop: watch the server.)
    while len(daemon.hub.connections) == 2 and sent < 2000:
        status, _, _ = await daemon.publish({"channel": "flood", "data": payload})
        assert status == 200
        sent += 1
        assert (await fast.next_of("message"))["offset"] == sent
    assert len(daemon.hub.connections) == 1, "the slow consumer was never dropped"
    assert sent > 10  # it was dropped for its buffer, not at once
    slow.transport.resumeProducing()
    await wait_for(lambda: slow.lost.called)
    status, body, _ = await daemon.get("/metrics")
    assert metric(body.decode(), "pushie_slow_consumer_disconnects_total") == 1
    assert len(daemon.hub.connections) == 1


@pytest_twisted.ensureDeferred
async def test_slow_consumer_grace_time(make_daemon):
    daemon = await make_daemon(slow_consumer_buffer=0, slow_consumer_grace=1.0)
    status, slow = await raw_handshake(daemon.port, "/websocket?channel=flood")
    slow.transport.pauseProducing()
    # Keep its buffers full: once the transport stays paused for a second, it is dropped.
    for _ in range(3000):
        await daemon.publish({"channel": "flood", "data": "y" * 10_000})
        if not daemon.hub.connections:
            break
    assert not daemon.hub.connections, "the slow consumer was never dropped"
    slow.transport.resumeProducing()
    await wait_for(lambda: slow.lost.called)


def test_grafana_dashboard_uses_only_metrics_that_exist():
    import re
    from pathlib import Path

    from pushie.metrics import Metrics

    dashboard = json.loads((Path(__file__).resolve().parent.parent / "contrib" / "grafana-dashboard.json").read_text())
    metrics = Metrics()
    metrics.reject("any")  # a labelled family shows its samples once it has a label
    exposed = {sample.name for family in metrics.registry.collect() for sample in family.samples}
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"pushie_[a-z_]+", target["expr"]))
    # The cluster and shard gauges exist only with the Redis engine (and shards): checked on a
    # daemon with two shards by tests/test_shard_hooks.py (test_counts_and_gauges_add_up_over_both_shards).
    used = {name for name in used if not name.startswith(("pushie_cluster_", "pushie_redis_shard_"))}
    assert used and used <= exposed | {n + "_bucket" for n in exposed}, used - exposed
