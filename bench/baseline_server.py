"""
The baseline: a minimal Twisted + Autobahn broadcast server.

What anyone would write first with these two libraries, and what every Pushie
figure in bench/run.py is compared to:

  - C{GET /websocket?channel=X} (Autobahn's WebSocketResource under
    twisted.web) subscribes the connection to X and answers
    C{{"type":"subscribed","channel":X,"offset":N,"epoch":"baseline"}};
  - C{POST /publish} with C{{"channel": X, "data": ...}} (or a JSON array of
    them) gives each message the next offset of its channel, builds the same
    JSON envelope as Pushie's and calls C{sendMessage} once per subscriber.

No history, no auth, no limits, no slow-consumer handling, no metrics, no
access log (Pushie has none either); Autobahn's and twisted.web's defaults
otherwise.  The
offsets are there only so that the load generator can count lost and
duplicated messages the same way for both servers.

    python bench/baseline_server.py --port 8090
"""

from __future__ import annotations

import argparse
import json
import resource
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.web.resource import Resource
from twisted.web.server import Site

EPOCH = "baseline"


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Broadcaster:
    def __init__(self) -> None:
        self.channels: dict[str, dict[BroadcastProtocol, None]] = {}
        self.offsets: dict[str, int] = {}

    def subscribe(self, channel: str, protocol: BroadcastProtocol) -> int:
        self.channels.setdefault(channel, {})[protocol] = None
        return self.offsets.get(channel, 0)

    def unsubscribe(self, channel: str, protocol: BroadcastProtocol) -> None:
        subscribers = self.channels.get(channel)
        if subscribers is not None:
            subscribers.pop(protocol, None)
            if not subscribers:
                del self.channels[channel]

    def publish(self, channel: str, data: Any) -> dict[str, Any]:
        offset = self.offsets[channel] = self.offsets.get(channel, 0) + 1
        envelope = dumps(
            {"type": "message", "channel": channel, "event": "message", "offset": offset, "epoch": EPOCH, "data": data}
        )
        for protocol in list(self.channels.get(channel, ())):
            protocol.sendMessage(envelope, isBinary=False)
        return {"channel": channel, "offset": offset, "epoch": EPOCH}


class BroadcastProtocol(WebSocketServerProtocol):
    factory: BroadcastFactory
    channel_names: list[str] = []

    def onConnect(self, request: Any) -> None:
        self.channel_names = request.params.get("channel", [])

    def onOpen(self) -> None:
        for name in self.channel_names:
            offset = self.factory.broadcaster.subscribe(name, self)
            self.sendMessage(
                dumps({"type": "subscribed", "channel": name, "offset": offset, "epoch": EPOCH}), isBinary=False
            )

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        for name in self.channel_names:
            self.factory.broadcaster.unsubscribe(name, self)


class BroadcastFactory(WebSocketServerFactory):
    protocol = BroadcastProtocol  # type: ignore[assignment]

    def __init__(self, broadcaster: Broadcaster) -> None:
        super().__init__()
        self.broadcaster = broadcaster


class QuietSite(Site):
    def log(self, request: Any) -> None:
        """No access log, like Pushie."""


class PublishResource(Resource):
    isLeaf = True

    def __init__(self, broadcaster: Broadcaster) -> None:
        super().__init__()
        self.broadcaster = broadcaster

    def render_POST(self, request: Any) -> bytes:
        body = json.loads(request.content.read())
        request.setHeader(b"content-type", b"application/json")
        if isinstance(body, list):
            return dumps({"results": [self.broadcaster.publish(item["channel"], item["data"]) for item in body]})
        return dumps(self.broadcaster.publish(body["channel"], body["data"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    broadcaster = Broadcaster()
    root = Resource()
    root.putChild(b"websocket", WebSocketResource(BroadcastFactory(broadcaster)))  # type: ignore[arg-type]
    root.putChild(b"publish", PublishResource(broadcaster))  # type: ignore[arg-type]
    reactor.listenTCP(args.port, QuietSite(root), interface="127.0.0.1")
    print(f"baseline listening on 127.0.0.1:{args.port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
