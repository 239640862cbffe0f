"""
The memory engine's budget, end to end: a real daemon with a tiny
C{memory_budget}, real publishes over HTTP and a real WebSocket client that
comes back asking for what was evicted (and is told C{recovered: false}).
"""

from __future__ import annotations

import re

import pytest
import pytest_twisted

from tests.helpers import assert_reactor_clean, start_daemon


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


@pytest_twisted.ensureDeferred
async def test_evicted_history_is_not_recovered_and_is_counted():
    daemon = await start_daemon(engine="memory", memory_budget=20_000, history_size=100, idempotency_max_keys=50)
    try:
        client = await daemon.connect("channel=watched")
        await client.next_of("welcome")
        await client.next_of("subscribed")
        # A second subscriber keeps the channel (its offset and epoch) while the first goes away.
        other = await daemon.connect("channel=watched")
        await other.next_of("welcome")
        await other.next_of("subscribed")
        status, _, _ = await daemon.publish([{"channel": "watched", "data": {"n": n}} for n in range(3)])
        assert status == 200
        first = await client.next_of("message")
        await client.next_of("message")
        await client.next_of("message")

        # Enough publications elsewhere, each with its own idempotency key, to pass the budget many times.
        for batch in range(10):
            body = [
                {"channel": f"other-{batch}-{i}", "data": "x" * 200, "idempotency_key": f"k{batch}-{i}"}
                for i in range(100)
            ]
            status, _, _ = await daemon.publish(body)
            assert status == 200
        engine = daemon.engine
        assert engine.used <= 20_000 and engine.evicted > 900
        assert len(engine._idempotency) == 50
        assert engine.channel_count() < 100  # evicted channels nobody follows were forgotten

        # The client comes back from its first message: that range was evicted.
        client.send({"type": "unsubscribe", "channel": "watched"})
        await client.next_of("unsubscribed")
        client.send(
            {"type": "subscribe", "channel": "watched", "since": {"offset": first["offset"], "epoch": first["epoch"]}}
        )
        answer = await client.next_of("subscribed")
        assert answer["recovered"] is False and (answer["offset"], answer["epoch"]) == (3, first["epoch"])

        status, body, _ = await daemon.get("/metrics")
        text = body.decode()
        assert _metric(text, "pushie_history_evicted_total") == engine.evicted
        assert _metric(text, "pushie_history_bytes") <= _metric(text, "pushie_memory_budget_bytes") == 20_000
        assert _metric(text, "pushie_idempotency_keys_evicted_total") == 950
    finally:
        await daemon.stop()
    await assert_reactor_clean()


def test_the_new_settings_are_read_and_checked():
    from pushie.config import ConfigError, load_settings

    settings = load_settings(
        {"memory_budget": "16MiB"}, {"PUSHIE_IDEMPOTENCY_MAX_KEYS": "7", "PUSHIE_WEBHOOK_MAX_QUEUE": "50"}
    )
    assert (settings.memory_budget, settings.idempotency_max_keys, settings.webhook_max_queue) == (16 << 20, 7, 50)
    assert load_settings(environ={"PUSHIE_MEMORY_BUDGET": "1048576"}).memory_budget == 1 << 20
    assert load_settings(environ={"PUSHIE_MEMORY_BUDGET": "2g"}).memory_budget == 2 << 30
    assert load_settings(environ={"PUSHIE_MEMORY_BUDGET": "0"}).memory_budget == 0
    defaults = load_settings()
    assert (defaults.memory_budget, defaults.idempotency_max_keys, defaults.webhook_max_queue) == (
        512 << 20,
        100_000,
        10_000,
    )
    for bad in ("-1", "lots", "12 parsecs", "1.5MiB", "9" * 30):
        with pytest.raises(ConfigError, match="memory_budget"):
            load_settings(environ={"PUSHIE_MEMORY_BUDGET": bad})
    with pytest.raises(ConfigError, match="webhook_max_queue"):
        load_settings(environ={"PUSHIE_WEBHOOK_MAX_QUEUE": "0"})
