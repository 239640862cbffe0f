# -*- test-case-name: tests.test_operations -*-
"""
Prometheus metrics, in the text format, served by a plain twisted.web
resource on the reactor thread (prometheus_client's own Twisted resource runs
collectors in a thread, which would race the Hub).

Each daemon has its own registry, so several daemons in one process (tests)
do not mix their figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web.resource import Resource
from twisted.web.server import Request


class Metrics:
    """The daemon's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge("pushie_connections", "Open client connections (WebSocket and SSE).", registry=r)
        self.subscriptions = Gauge("pushie_subscriptions", "Subscriptions held by open connections.", registry=r)
        self.channels = Gauge("pushie_channels", "Channels with local subscribers.", registry=r)
        self.publications = Counter(
            "pushie_publications", "Publications accepted (200) by this daemon's /publish.", registry=r
        )
        self.deliveries = Counter(
            "pushie_deliveries", "Messages handed to local subscribers (one per subscriber per message).", registry=r
        )
        self.publish_seconds = Histogram(
            "pushie_publish_seconds",
            "Time from a /publish request's arrival to its answer.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.rejected = Counter(
            "pushie_rejected_requests", "Requests and frames refused, by reason (error code).", ["reason"], registry=r
        )
        self.slow_consumers = Counter(
            "pushie_slow_consumer_disconnects", "Connections closed because they did not read fast enough.", registry=r
        )
        self.engine_errors = Counter(
            "pushie_engine_errors", "Engine operations that failed (the request answered 503).", registry=r
        )
        self.webhooks_failed = Counter(
            "pushie_webhook_failures", "Webhook deliveries given up after their retries.", registry=r
        )

    def watch_hub(self, hub: Any, engine: Any) -> None:
        """Read the gauges from the Hub (and its engine's bounds) when scraped, never on the hot path."""
        self.connections.set_function(lambda: len(hub.connections))
        self.channels.set_function(lambda: len(hub.channel_names()))
        self.subscriptions.set_function(lambda: sum(hub.subscriber_count(c) for c in hub.channel_names()))
        self.registry.register(_BoundsCollector(hub, engine))

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()


class _BoundsCollector:
    """
    What the bounded stores gave up, read when scraped: the memory engine's
    evictions and accounted bytes, the webhook events dropped from a full
    queue; whether each Redis shard is up; and the Redis engine's cluster-wide
    figures (C{engine.cluster}).  The engine and the webhooks keep plain counts (no metrics on their
    hot paths); the webhooks are looked up on the Hub at each scrape, since
    they are attached after it is built.
    """

    def __init__(self, hub: Any, engine: Any) -> None:
        self.hub = hub
        self.engine = engine

    def describe(self) -> list[Metric]:
        return []  # the families depend on the engine and on webhooks being on

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        if hasattr(engine, "evicted"):
            yield CounterMetricFamily(
                "pushie_history_evicted",
                "Publications evicted from the memory engine's history to stay within memory_budget.",
                value=engine.evicted,
            )
            yield GaugeMetricFamily(
                "pushie_history_bytes", "Bytes the memory engine's history is accounted for.", value=engine.used
            )
            yield GaugeMetricFamily(
                "pushie_memory_budget_bytes",
                "The memory engine's memory_budget (0: no limit).",
                value=engine.memory_budget,
            )
            yield CounterMetricFamily(
                "pushie_idempotency_keys_evicted",
                "Idempotency keys forgotten before their window ended, to stay within idempotency_max_keys.",
                value=engine.idempotency_evicted,
            )
        shards_health = getattr(engine, "shards_health", None)
        if shards_health is not None:
            up = GaugeMetricFamily(
                "pushie_redis_shard_up",
                "Redis shards: 1 while the shard takes publications from this daemon, else 0.",
                labels=["shard"],
            )
            for name, healthy in shards_health().items():
                up.add_metric([name], 1 if healthy else 0)
            yield up
        cluster = getattr(engine, "cluster", None)
        if cluster is not None:
            # The Redis engine's figures for every live node, as of its last heartbeat.
            for name, text, value in (
                ("pushie_cluster_nodes", "Live daemons sharing this daemon's Redis.", cluster.nodes),
                ("pushie_cluster_connections", "Open client connections on every live daemon.", cluster.connections),
                ("pushie_cluster_subscriptions", "Subscriptions held on every live daemon.", cluster.subscriptions),
                ("pushie_cluster_channels", "Channels with subscribers on some live daemon.", cluster.channels),
            ):
                yield GaugeMetricFamily(name, text + " (cluster-wide, refreshed every 2 s)", value=value)
        webhooks = getattr(self.hub, "webhooks", None)
        if webhooks is not None:
            dropped = CounterMetricFamily(
                "pushie_webhook_events_dropped",
                "Webhook events dropped from a full queue (webhook_max_queue), by event name.",
                labels=["event"],
            )
            for name, count in sorted(webhooks.dropped_by_event.items()):
                dropped.add_metric([name], count)
            yield dropped
            yield GaugeMetricFamily(
                "pushie_webhook_queue", "Webhook events waiting for delivery.", value=webhooks.queued
            )


class MetricsResource(Resource):
    """C{GET /metrics}: the Prometheus text format, no key needed."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.metrics.registry)
