"""
How long one publish to N local subscribers holds the reactor.

Starts a Pushie daemon in this process (memory engine), opens N WebSocket
connections from a separate client process (plain sockets, so the client
costs the server nothing), subscribes them all to one channel and then times
the synchronous part of `Hub.publish` (offset, encode once, write to every
transport) for a number of publications.  As a baseline in the same run, the
same connections get the same payload through Autobahn's `sendMessage`, one
call per connection, as a plain Autobahn broadcast server would.

    python bench/fanout_block.py --subscribers 10000 --rounds 20

Prints JSON and a markdown table.  Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CLIENT = r"""
import base64, os, selectors, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(("GET /websocket?channel=bench HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key).encode())
    socks.append(s)
sel = selectors.DefaultSelector()
for s in socks:
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
print("connected", flush=True)
total = 0
while True:
    for key, _ in sel.select(timeout=1):
        try:
            data = key.fileobj.recv(1 << 16)
        except BlockingIOError:
            continue
        if not data:
            sel.unregister(key.fileobj)
            continue
        total += len(data)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subscribers", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", default=None, help="write the JSON result to this file")
    parser.add_argument(
        "--plain-write",
        action="store_true",
        help="use transport.write instead of the socket-first path (to measure what that path buys)",
    )
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    from twisted.internet import reactor, task
    from twisted.internet.defer import ensureDeferred

    from pushie.config import Settings
    from pushie.records import PublishRequest
    from pushie.tap import PushieService
    from pushie.wire import dumps

    if args.plain_write:
        import pushie.doors._wsbase

        # The doors' frames leave through _wsbase's write_now (the socket-first path).
        pushie.doors._wsbase.write_now = lambda transport, data: transport.write(data)

    settings = Settings.defaults().replace(
        listen=["tcp:0:interface=127.0.0.1"], ping_interval=0.0, max_connections=0, max_connections_per_ip=0
    )
    service = PushieService(settings, reactor)
    result: dict = {}

    async def run() -> None:
        await service.startService()
        port = service.ports()[0].getHost().port
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(port), str(args.subscribers)], stdout=subprocess.PIPE
        )
        hub = service.hub
        while hub.subscriber_count("bench") < args.subscribers:
            await task.deferLater(reactor, 0.1, lambda: None)
        payload = {"text": "x" * 60}
        transports = [c.transport for c in hub.connections]

        async def flushed(started: float) -> float:
            """Milliseconds from C{started} until every transport has sent what it was given."""
            while any(t.dataBuffer or t._tempDataLen for t in transports):
                await task.deferLater(reactor, 0, lambda: None)
            return (time.perf_counter() - started) * 1000

        pushie_ms = []
        pushie_flush_ms = []
        for _ in range(args.rounds):
            request = PublishRequest("bench", dumps(payload))
            started = time.perf_counter()
            hub.publish([request])
            pushie_ms.append((time.perf_counter() - started) * 1000)
            pushie_flush_ms.append(await flushed(started))
            await task.deferLater(reactor, 0.2, lambda: None)
        # Baseline: one Autobahn sendMessage per connection, same envelope size.
        protocols = list(hub.connections)
        envelope = (
            b'{"type":"message","channel":"bench","event":"message","offset":1,"epoch":"xxxxxxxxxxx","data":'
            + dumps(payload)
            + b"}"
        )
        baseline_ms = []
        baseline_flush_ms = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            for p in protocols:
                p.sendMessage(envelope, isBinary=False)
            baseline_ms.append((time.perf_counter() - started) * 1000)
            baseline_flush_ms.append(await flushed(started))
            await task.deferLater(reactor, 0.2, lambda: None)
        client.kill()
        client.wait()
        await service.stopService()
        result.update(
            subscribers=args.subscribers,
            rounds=args.rounds,
            pushie_publish_ms={"median": statistics.median(pushie_ms), "max": max(pushie_ms)},
            autobahn_sendMessage_loop_ms={"median": statistics.median(baseline_ms), "max": max(baseline_ms)},
            ratio_median=statistics.median(baseline_ms) / statistics.median(pushie_ms),
            pushie_until_sent_ms={"median": statistics.median(pushie_flush_ms), "max": max(pushie_flush_ms)},
            autobahn_until_sent_ms={"median": statistics.median(baseline_flush_ms), "max": max(baseline_flush_ms)},
            ratio_until_sent=statistics.median(baseline_flush_ms) / statistics.median(pushie_flush_ms),
        )

    def done(_: object) -> None:
        reactor.stop()

    ensureDeferred(run()).addErrback(lambda f: (f.printTraceback(), None)[1]).addBoth(done)
    reactor.run()
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if result:
        print()
        print("| scenario | median ms | max ms |")
        print("|---|---|---|")
        print(
            f"| Pushie publish to {args.subscribers} subscribers (reactor blocked) | "
            f"{result['pushie_publish_ms']['median']:.1f} | {result['pushie_publish_ms']['max']:.1f} |"
        )
        baseline = result["autobahn_sendMessage_loop_ms"]
        print(f"| baseline: Autobahn sendMessage loop | {baseline['median']:.1f} | {baseline['max']:.1f} |")
        sent, base_sent = result["pushie_until_sent_ms"], result["autobahn_until_sent_ms"]
        print(f"| Pushie: until every frame is handed to the kernel | {sent['median']:.1f} | {sent['max']:.1f} |")
        print(
            "| baseline: until every frame is handed to the kernel | "
            f"{base_sent['median']:.1f} | {base_sent['max']:.1f} |"
        )
        print(
            f"\nBaseline / Pushie, median: {result['ratio_median']:.2f}x for the publish call, "
            f"{result['ratio_until_sent']:.2f}x until sent."
        )


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
