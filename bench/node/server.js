// The Node peer of Pushie's bench: what anyone would write first with `ws`.
//
// The same URLs and envelope as bench/baseline_server.py, so that the load
// generator (bench/loadgen.py) drives it unchanged:
//   GET /websocket?channel=X  subscribes the connection to X (repeat channel=
//       for several) and sends {"type":"subscribed","channel":X,"offset":N,"epoch":"node"};
//   POST /publish with {"channel": X, "data": ...} (or a JSON array of them)
//       gives each message the next offset of its channel, builds the JSON
//       envelope once and sends it to every subscriber.
// No history, no auth, no limits, no access log; ws's defaults otherwise
// (permessage-deflate off).  The offsets exist only so that the load
// generator can count lost and duplicated messages.
//
//   node bench/node/server.js --port 8091
"use strict";

const http = require("http");
const { WebSocketServer } = require("ws");

const EPOCH = "node";
const args = process.argv.slice(2);
const portIndex = args.indexOf("--port");
const port = portIndex >= 0 ? Number(args[portIndex + 1]) : 8091;

const channels = new Map(); // name -> Set of sockets
const offsets = new Map(); // name -> last offset

function publish(channel, data) {
  const offset = (offsets.get(channel) || 0) + 1;
  offsets.set(channel, offset);
  const envelope = Buffer.from(
    JSON.stringify({ type: "message", channel, event: "message", offset, epoch: EPOCH, data }),
  );
  const subscribers = channels.get(channel);
  if (subscribers) {
    for (const ws of subscribers) ws.send(envelope, { binary: false });
  }
  return { channel, offset, epoch: EPOCH };
}

const server = http.createServer((req, res) => {
  if (req.method !== "POST" || req.url !== "/publish") {
    res.writeHead(404, { "content-type": "application/json" });
    res.end('{"error":"not found"}');
    return;
  }
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch (e) {
      res.writeHead(400, { "content-type": "application/json" });
      res.end(JSON.stringify({ error: String(e) }));
      return;
    }
    const answer = Array.isArray(body)
      ? { results: body.map((item) => publish(item.channel, item.data)) }
      : publish(body.channel, body.data);
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify(answer));
  });
});

const wss = new WebSocketServer({ noServer: true });

server.on("upgrade", (req, socket, head) => {
  const url = new URL(req.url, "http://localhost");
  if (url.pathname !== "/websocket") {
    socket.destroy();
    return;
  }
  const names = url.searchParams.getAll("channel");
  wss.handleUpgrade(req, socket, head, (ws) => {
    for (const name of names) {
      let subscribers = channels.get(name);
      if (!subscribers) channels.set(name, (subscribers = new Set()));
      subscribers.add(ws);
      ws.send(JSON.stringify({ type: "subscribed", channel: name, offset: offsets.get(name) || 0, epoch: EPOCH }));
    }
    ws.on("close", () => {
      for (const name of names) {
        const subscribers = channels.get(name);
        if (subscribers) {
          subscribers.delete(ws);
          if (subscribers.size === 0) channels.delete(name);
        }
      }
    });
    ws.on("error", () => {});
  });
});

server.keepAliveTimeout = 60000;
server.listen({ port, host: "127.0.0.1", backlog: 511 }, () => {
  console.log(`node ws listening on 127.0.0.1:${port}`);
});
process.on("SIGTERM", () => process.exit(0));
