"""
What the memory engine's budget holds in practice: publish N messages to N
distinct channels (nobody subscribed, as a flood of publishes would) and
report the accounted bytes, the Python heap (tracemalloc) and the process RSS.

    PYTHONPATH=. python bench/memory_budget.py [--budget 16MiB] [--count 100000] [--size 100] [--envelope] [--keys]

--envelope builds each publication's envelope and WebSocket frame, as
delivery to one subscriber would.  Not a test: figures for README, Limits.
"""

from __future__ import annotations

import argparse
import gc
import resource
import tracemalloc

from twisted.internet.task import Clock

from pushie.config import _bytes
from pushie.engines.memory import MemoryEngine
from pushie.records import PublishRequest


class Listener:
    def __init__(self, build: bool) -> None:
        self.build = build

    def dispatch(self, publication) -> None:
        if self.build:
            publication.websocket_frame  # noqa: B018  (builds and caches the envelope and the frame)

    def presence_changed(self, event) -> None:
        pass


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", default="16MiB")
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=100, help="bytes of data per publication")
    parser.add_argument("--envelope", action="store_true")
    parser.add_argument("--channels", type=int, default=0, help="round-robin over N channels (0: distinct)")
    parser.add_argument("--keys", action="store_true", help="give each publish its own idempotency key")
    parser.add_argument("--trace", action="store_true", help="also measure the heap with tracemalloc (slower)")
    args = parser.parse_args()
    budget = _bytes(args.budget)
    channels = args.channels
    engine = MemoryEngine(clock=Clock(), memory_budget=budget)
    engine.start(Listener(args.envelope))
    data = b'"' + b"x" * (args.size - 2) + b'"'
    gc.collect()
    before = rss_mib()
    if args.trace:
        tracemalloc.start()
    for i in range(args.count):
        name = f"channel-{i % channels if channels else i:07d}"
        engine.append([PublishRequest(name, data, idempotency_key=f"key-{i}" if args.keys else None)])
    gc.collect()
    heap = tracemalloc.get_traced_memory()[0] if args.trace else None
    after = rss_mib()
    kept = len(engine._kept)
    print(
        f"budget {budget} B, {args.count} publishes of {args.size} B to {channels or 'distinct'} channels"
        f"{' (envelope and frame built)' if args.envelope else ''}:"
    )
    print(f"  kept {kept} publications in {engine.channel_count()} channels, evicted {engine.evicted}")
    print(f"  accounted {engine.used} B ({engine.used / max(kept, 1):.0f} B per kept publication)")
    print(f"  idempotency keys {len(engine._idempotency)} (evicted {engine.idempotency_evicted})")
    if heap is not None:
        per = heap / max(kept, 1)
        print(f"  Python heap held {heap / 2**20:.1f} MiB ({per:.0f} B per kept publication, keys included if any)")
    print(f"  RSS {before:.1f} MiB before, {after:.1f} MiB after (+{after - before:.1f} MiB)")


if __name__ == "__main__":
    main()
