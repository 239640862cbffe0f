/*
 * pushie.js: the browser client for Pushie.  No dependencies, no build step.
 *
 *   <script src="/pushie.js"></script>
 *   <script>
 *     var pushie = new Pushie("/websocket", {token: "...", onState: function (state, detail) {}});
 *     var sub = pushie.subscribe("bunno", function (data, envelope) { ... }, {
 *       onSubscribed: function (info) {},            // {channel, offset, epoch, recovered}
 *       onRecoveryFailed: function (channel, info) {} // missed messages are gone: reload your state
 *     });
 *     sub.unsubscribe();
 *     pushie.setToken(freshToken);  // before the old token's exp
 *     pushie.close();
 *   </script>
 *
 * The client keeps one WebSocket open.  When it closes, the client reconnects
 * with a jittered exponential backoff, subscribes again to every channel and
 * asks for what it missed ("since" the last offset and epoch it saw); when the
 * server can no longer replay them, onRecoveryFailed says so.  Messages are
 * handed over once each, in offset order per channel.
 *
 * It does not reconnect after close(), after close code 4001 (the token
 * expired: it reconnects once setToken() gives a new one) or after 1008
 * (policy violation: setToken() or reconnect() try again).
 *
 * Options:
 *   token        subscriber token (JWT), sent as ?token= when connecting
 *   minDelay     first reconnect delay in ms (500); doubles each failed attempt
 *   maxDelay     largest reconnect delay in ms (15000)
 *   pingInterval ms between {"type": "ping"} frames while open (25000; 0: none)
 *   pongTimeout  ms to wait for any frame after a ping before giving the
 *                connection up as dead and reconnecting (10000; 0: never)
 *   onState(state, detail)  state is "connecting", "open" or "closed"; a
 *                "closed" detail is {code, reason, wasClean, reconnectIn}
 *                (reconnectIn in ms, null when the client will not reconnect
 *                by itself)
 *   onError(frame)   every {"type": "error"} frame from the server, and every
 *                    "unsubscribed" frame with a code (a channel the server
 *                    dropped: a refreshed token no longer grants it)
 *   onFrame(frame)   every other frame the client does not handle itself
 *                    (presence "join"/"leave", "authorized", ...)
 *   WebSocket        the WebSocket constructor to use (default: the browser's)
 */
(function (root) {
  "use strict";

  var OPEN = 1;

  function option(options, name, fallback) {
    return options[name] === undefined || options[name] === null ? fallback : options[name];
  }

  // A callback of the application must not break the client: report what it
  // throws the way an uncaught error is reported, and carry on.
  function call(fn) {
    if (typeof fn !== "function") {
      return;
    }
    try {
      fn.apply(null, Array.prototype.slice.call(arguments, 1));
    } catch (e) {
      setTimeout(function () { throw e; }, 0);
    }
  }

  // The WebSocket URL: ws:// and wss:// URLs as given, http(s) and relative
  // URLs turned into ws(s) ones; a bare host gets /websocket.
  function websocketUrl(url) {
    var location = root && root.location;
    var parsed;
    if (url === undefined || url === null || url === "") {
      if (!location) {
        throw new TypeError("Pushie: give the WebSocket URL (there is no page location to start from)");
      }
      parsed = new URL("/websocket", location.href);
    } else {
      parsed = location ? new URL(String(url), location.href) : new URL(String(url));
    }
    if (parsed.protocol === "http:") {
      parsed.protocol = "ws:";
    } else if (parsed.protocol === "https:") {
      parsed.protocol = "wss:";
    } else if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
      throw new TypeError("Pushie: the URL must be ws://, wss://, http:// or https://, not " + parsed.protocol);
    }
    if (parsed.pathname === "" || parsed.pathname === "/") {
      parsed.pathname = "/websocket";
    }
    parsed.hash = "";
    return parsed.href;
  }

  class Subscription {
    constructor(client, channel, onMessage, options) {
      this.channel = channel;
      this.active = true;
      this._client = client;
      this._onMessage = onMessage;
      this._options = options;
    }

    unsubscribe() {
      if (this.active) {
        this.active = false;
        this._client._unsubscribe(this);
      }
    }
  }

  class Pushie {
    constructor(url, options) {
      options = options || {};
      this.url = websocketUrl(url);
      this.token = option(options, "token", null);
      this.minDelay = option(options, "minDelay", 500);
      this.maxDelay = option(options, "maxDelay", 15000);
      this.pingInterval = option(options, "pingInterval", 25000);
      this.pongTimeout = option(options, "pongTimeout", 10000);
      this.onState = options.onState || null;
      this.onError = options.onError || null;
      this.onFrame = options.onFrame || null;
      this.state = "closed";
      this._WebSocket = options.WebSocket || root.WebSocket;
      // channel name -> {name, subs, offset, epoch, status}; status is "idle"
      // (not asked on this connection), "pending" (subscribe sent),
      // "subscribed" or "failed" (refused by the server).
      this._channels = new Map();
      this._socket = null;
      this._urlToken = null;
      this._attempt = 0;
      this._reconnectTimer = null;
      this._pingTimer = null;
      this._pongTimer = null;
      this._stopped = false; // close() was called
      this._halted = false; // closed with 4001/1008: waits for setToken()/reconnect()
      // Back online: try now rather than at the end of the backoff.
      this._online = function () {
        if (!this._halted) {
          this.reconnect();
        }
      }.bind(this);
      if (root.addEventListener) {
        root.addEventListener("online", this._online);
      }
      this._connect();
    }

    // -- public ----------------------------------------------------------

    subscribe(channel, onMessage, options) {
      if (typeof channel !== "string" || channel === "") {
        throw new TypeError("Pushie: a channel name is a non-empty string");
      }
      options = options || {};
      var sub = new Subscription(this, channel, onMessage, options);
      var entry = this._channels.get(channel);
      if (entry === undefined) {
        entry = {name: channel, subs: [], offset: null, epoch: null, status: "idle"};
        if (options.since && options.since.epoch !== undefined) {
          // Start from a position the app already has (from the history API, say).
          entry.offset = options.since.offset;
          entry.epoch = options.since.epoch;
        }
        this._channels.set(channel, entry);
      }
      entry.subs.push(sub);
      if (entry.status === "subscribed") {
        // Joins a stream already flowing: it gets the messages from now on.
        var info = {channel: channel, offset: entry.offset, epoch: entry.epoch};
        Promise.resolve().then(function () {
          if (sub.active) {
            call(options.onSubscribed, info);
          }
        });
      } else if (entry.status !== "pending") {
        this._sendSubscribe(entry);
      }
      return sub;
    }

    setToken(token) {
      this.token = token;
      if (this._isOpen()) {
        this._send({type: "auth", token: token});
        // Channels the old token did not grant may be granted now.
        this._channels.forEach(function (entry) {
          if (entry.status === "failed" && entry.subs.length) {
            this._sendSubscribe(entry);
          }
        }, this);
      } else if (this._halted) {
        this.reconnect();
      }
    }

    // Connect now if the client is waiting to reconnect (or gave up after 4001/1008).
    reconnect() {
      if (this._stopped || this._socket !== null) {
        return;
      }
      this._halted = false;
      this._attempt = 0;
      this._connect();
    }

    close() {
      if (this._stopped) {
        return;
      }
      this._stopped = true;
      if (root.removeEventListener) {
        root.removeEventListener("online", this._online);
      }
      clearTimeout(this._reconnectTimer);
      this._reconnectTimer = null;
      var socket = this._socket;
      if (socket !== null) {
        this._forget(socket);
        try {
          socket.close(1000);
        } catch (e) {
          // already closing
        }
        this._closed(1000, "closed by the client", true);
      }
    }

    // -- connection ------------------------------------------------------

    _connect() {
      clearTimeout(this._reconnectTimer);
      this._reconnectTimer = null;
      if (this._stopped || this._socket !== null) {
        return;
      }
      var url = new URL(this.url);
      if (this.token) {
        url.searchParams.set("token", this.token);
      }
      this._urlToken = this.token;
      this._setState("connecting");
      var socket;
      try {
        socket = new this._WebSocket(url.href);
      } catch (e) {
        call(this.onError, {type: "error", code: "connect_failed", message: String(e)});
        this._stopped = true;
        this._setState("closed", {code: 1006, reason: String(e), wasClean: false, reconnectIn: null});
        return;
      }
      this._socket = socket;
      var self = this;
      socket.onopen = function () { self._opened(socket); };
      socket.onmessage = function (event) { self._received(socket, event.data); };
      socket.onclose = function (event) {
        if (socket === self._socket) {
          self._forget(socket);
          self._closed(event.code, event.reason, event.wasClean);
        }
      };
      socket.onerror = function () {}; // a close event follows
    }

    _opened(socket) {
      if (socket !== this._socket) {
        return;
      }
      this._attempt = 0;
      this._setState("open");
      if (this.token && this.token !== this._urlToken) {
        this._send({type: "auth", token: this.token}); // setToken() while connecting
      }
      this._channels.forEach(function (entry) {
        this._sendSubscribe(entry);
      }, this);
      if (this.pingInterval > 0) {
        this._pingTimer = setInterval(this._ping.bind(this), this.pingInterval);
      }
    }

    _ping() {
      this._send({type: "ping"});
      if (this.pongTimeout > 0 && this._pongTimer === null) {
        var socket = this._socket;
        this._pongTimer = setTimeout(function () {
          this._pongTimer = null;
          if (socket === this._socket) {
            // No answer: the network is gone without a close.  Do not wait
            // for the browser to notice; start over.
            this._forget(socket);
            try {
              socket.close(4000, "no pong");
            } catch (e) {
              // ignore
            }
            this._closed(1006, "no answer to ping", false);
          }
        }.bind(this), this.pongTimeout);
      }
    }

    // Detach from a socket that is done with.
    _forget(socket) {
      socket.onopen = socket.onmessage = socket.onclose = null;
      socket.onerror = function () {};
      this._socket = null;
      clearInterval(this._pingTimer);
      clearTimeout(this._pongTimer);
      this._pingTimer = null;
      this._pongTimer = null;
    }

    _closed(code, reason, wasClean) {
      // Nothing is subscribed on the server any more; forget channels nobody wants.
      this._channels.forEach(function (entry, name) {
        if (entry.subs.length) {
          entry.status = "idle";
        } else {
          this._channels.delete(name);
        }
      }, this);
      var delay = null;
      if (this._stopped) {
        delay = null;
      } else if (code === 4001 || code === 1008) {
        this._halted = true;
      } else {
        var ceiling = Math.min(this.maxDelay, this.minDelay * Math.pow(2, Math.min(this._attempt, 30)));
        delay = Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
        this._attempt += 1;
        this._reconnectTimer = setTimeout(this._connect.bind(this), delay);
      }
      this._setState("closed", {code: code, reason: reason || "", wasClean: !!wasClean, reconnectIn: delay});
    }

    _setState(state, detail) {
      this.state = state;
      call(this.onState, state, detail || {});
    }

    _isOpen() {
      return this._socket !== null && this._socket.readyState === OPEN;
    }

    _send(frame) {
      if (this._isOpen()) {
        this._socket.send(JSON.stringify(frame));
        return true;
      }
      return false;
    }

    // -- channels --------------------------------------------------------

    _sendSubscribe(entry) {
      var frame = {type: "subscribe", channel: entry.name};
      if (entry.epoch !== null) {
        frame.since = {offset: entry.offset, epoch: entry.epoch};
      }
      if (this._send(frame)) {
        entry.status = "pending";
        entry.askedSince = frame.since !== undefined;
      }
    }

    _unsubscribe(sub) {
      var entry = this._channels.get(sub.channel);
      if (entry === undefined) {
        return;
      }
      var at = entry.subs.indexOf(sub);
      if (at >= 0) {
        entry.subs.splice(at, 1);
      }
      if (entry.subs.length) {
        return;
      }
      if (entry.status === "pending") {
        return; // unsubscribed once the server has answered, unless someone subscribes again
      }
      this._channels.delete(entry.name);
      if (entry.status === "subscribed") {
        this._send({type: "unsubscribe", channel: entry.name});
      }
    }

    _received(socket, text) {
      if (socket !== this._socket) {
        return;
      }
      clearTimeout(this._pongTimer);
      this._pongTimer = null;
      var frame;
      try {
        frame = JSON.parse(text);
      } catch (e) {
        return;
      }
      if (frame === null || typeof frame !== "object") {
        return;
      }
      switch (frame.type) {
        case "message":
          this._message(frame);
          break;
        case "subscribed":
          this._subscribed(frame);
          break;
        case "error":
          this._error(frame);
          break;
        case "unsubscribed":
          if (typeof frame.code === "string") {
            this._dropped(frame);
          }
          break;
        case "pong":
        case "welcome":
          break;
        default:
          call(this.onFrame, frame);
      }
    }

    _subscribed(frame) {
      var entry = this._channels.get(frame.channel);
      if (entry === undefined || entry.status !== "pending") {
        return;
      }
      entry.status = "subscribed";
      if (!entry.subs.length) {
        // Everyone left while the server was answering.
        this._channels.delete(entry.name);
        this._send({type: "unsubscribe", channel: entry.name});
        return;
      }
      var recovered = frame.recovered;
      var lost = false;
      if (entry.askedSince) {
        if (recovered === undefined) {
          // A server that does not know "since": nothing was replayed, so
          // nothing is missing only if the channel has not moved.
          recovered = frame.epoch === entry.epoch && frame.offset === entry.offset;
        }
        lost = !recovered;
      }
      if (!entry.askedSince || lost) {
        entry.offset = frame.offset;
        entry.epoch = frame.epoch;
      }
      // When recovered, the missed messages follow; the position stays where
      // the client was so that they are let through.
      var info = {channel: frame.channel, offset: frame.offset, epoch: frame.epoch};
      if (entry.askedSince) {
        info.recovered = !lost;
      }
      if (frame.members !== undefined) {
        info.members = frame.members;
      }
      entry.subs.slice().forEach(function (sub) {
        if (sub.active) {
          if (lost) {
            call(sub._options.onRecoveryFailed, frame.channel, info);
          }
          call(sub._options.onSubscribed, info);
        }
      });
    }

    _message(frame) {
      var entry = this._channels.get(frame.channel);
      if (entry === undefined || entry.status !== "subscribed") {
        return; // left over from an earlier subscription
      }
      if (frame.epoch === entry.epoch && typeof frame.offset === "number" && frame.offset <= entry.offset) {
        return; // seen already
      }
      entry.offset = frame.offset;
      entry.epoch = frame.epoch;
      entry.subs.slice().forEach(function (sub) {
        if (sub.active) {
          call(sub._onMessage, frame.data, frame);
        }
      });
    }

    _dropped(frame) {
      // The server dropped a channel on its own (an "unsubscribed" frame with
      // a code: a refreshed token no longer grants it). Reported like a
      // refused subscribe, and asked again after setToken().
      call(this.onError, frame);
      var entry = this._channels.get(frame.channel);
      if (entry !== undefined) {
        this._failed(entry, frame);
      }
    }

    _failed(entry, frame) {
      // A channel the server will not deliver (refused, or dropped): it is
      // asked again on the next connection or after setToken().
      entry.status = "failed";
      if (!entry.subs.length) {
        this._channels.delete(entry.name);
        return;
      }
      entry.subs.slice().forEach(function (sub) {
        if (sub.active) {
          call(sub._options.onError, frame);
        }
      });
    }

    _error(frame) {
      call(this.onError, frame);
      if (typeof frame.channel !== "string") {
        return;
      }
      var entry = this._channels.get(frame.channel);
      if (entry === undefined || entry.status !== "pending" || frame.code === "not_subscribed") {
        return;
      }
      // The subscribe was refused (forbidden, unauthorized, engine down...).
      this._failed(entry, frame);
    }
  }

  Pushie.Subscription = Subscription;
  Pushie.websocketUrl = websocketUrl;

  if (typeof module === "object" && module && module.exports) {
    module.exports = Pushie;
  }
  if (root) {
    root.Pushie = Pushie;
  }
})(typeof self !== "undefined" ? self : typeof globalThis !== "undefined" ? globalThis : this);
