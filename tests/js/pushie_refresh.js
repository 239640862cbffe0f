// Drives pushie.js (Node's WebSocket, node >= 20 with --experimental-websocket)
// through a token refresh that takes a grant away; prints one JSON line per event.
// Usage: node --experimental-websocket pushie_refresh.js <pushie.js> <ws url> <token> <narrower token>
"use strict";
const [script, url, token, narrower] = process.argv.slice(2);
const Pushie = require(script);
const say = (report) => process.stdout.write(JSON.stringify(report) + "\n");
const pushie = new Pushie(url, {
  token,
  onError: (frame) => say({on: "error", frame}),
  onFrame: (frame) => {
    say({on: "frame", frame});
    if (frame.type === "authorized") {
      setTimeout(() => { pushie.close(); process.exit(0); }, 200);
    }
  },
});
pushie.subscribe("private-a", () => {}, {
  onSubscribed: (info) => {
    say({on: "subscribed", channel: info.channel});
    pushie.setToken(narrower);
  },
  onError: (frame) => say({on: "subscription error", frame}),
});
setTimeout(() => { say({on: "timeout"}); process.exit(1); }, 5000);
