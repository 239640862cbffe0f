/*
 * pushie-pusher.js: recovery for pusher-js apps on a Pushie server.
 *
 * After a reconnect, pusher-js subscribes again to every channel, and with
 * Pusher that is all: what was published while the connection was down is
 * gone.  With this plugin each subscription opts in to Pushie's recovery
 * extension (docs/PROTOCOL.md, "Recovery for Pusher clients"): the plugin
 * remembers the position (offset, epoch) of the last event of each channel,
 * resubscribes from it, and the server sends the events that were missed, in
 * order, before the live ones; or says that it cannot (the history no longer
 * holds them), and the channel gets a "pushie:recovery" event with
 * {recovered: false} so that the app reloads its state.
 *
 *   <script src="https://js.pusher.com/8.4.0/pusher.min.js"></script>  (or your bundle)
 *   <script src="https://your-pushie-server/pushie-pusher.js"></script>
 *   var pusher = new Pusher(key, {wsHost: ..., forceTLS: ..., enabledTransports: ["ws", "wss"]});
 *   PushieRecovery.enable(pusher);                    // before subscribing
 *   var channel = pusher.subscribe("orders");
 *   channel.bind("pushie:recovery", function (info) { if (!info.recovered) reloadOrders(); });
 *
 * Laravel Echo: give Echo the same Pusher instance (new Echo({broadcaster:
 * "pusher", client: pusher, ...})), or enable the one it made:
 * PushieRecovery.enable(echo.connector.pusher); then
 * echo.channel("orders").listen(".pushie:recovery", ...).
 *
 * Events are handed to pusher-js (and so to the app) at most once: one at
 * or before the channel's last position is dropped, as a safety net (the
 * server replays from exactly the position given).
 *
 * No dependencies; a plain script (global PushieRecovery), a CommonJS
 * module or an AMD module.
 *
 * It leans on pusher-js internals, checked with pusher-js 8.6.0 (the same
 * since 7.0): Pusher#send_event (what Channel#subscribe calls to send
 * pusher:subscribe) and pusher.connection.connection.transport, whose
 * emit("message", event) carries each raw frame before pusher-js decodes it
 * (the decoded event keeps no field but event, channel, data and user_id).
 */
(function (root, factory) {
  if (typeof define === "function" && define.amd) {
    define([], factory);
  } else if (typeof module === "object" && module.exports) {
    module.exports = factory();
  } else {
    root.PushieRecovery = factory();
  }
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";

  var FIELD = "pushie";
  var SUCCEEDED = "pusher_internal:subscription_succeeded";
  var SKIP = "pusher_internal:pushie_skip";
  var RECOVERY_EVENT = "pushie:recovery";

  function copy(object, extra) {
    var result = {};
    var key;
    for (key in object) {
      if (Object.prototype.hasOwnProperty.call(object, key)) result[key] = object[key];
    }
    for (key in extra) {
      if (Object.prototype.hasOwnProperty.call(extra, key)) result[key] = extra[key];
    }
    return result;
  }

  function isPosition(value) {
    return value && typeof value.offset === "number" && typeof value.epoch === "string";
  }

  /**
   * Turn recovery on for a Pusher instance (once; a second call returns the
   * same handle).  Call it before subscribing: a channel subscribed before
   * has no position until its next event.
   *
   * options.onRecovery(channelName, {recovered, offset, epoch}): called after
   * every resubscription that resumed from a position, as the channel's
   * "pushie:recovery" event is.
   *
   * Returns {position(channelName): {offset, epoch} | null, forget(channelName)}.
   */
  function enable(pusher, options) {
    if (pusher.__pushieRecovery) return pusher.__pushieRecovery;
    options = options || {};
    var positions = {};

    function subscribed(name) {
      var channel = pusher.channel(name);
      return channel && !channel.subscriptionCancelled;
    }

    // Every pusher:subscribe carries the extension's field: {} the first
    // time, {since: position} once the channel has one.
    var sendEvent = pusher.send_event;
    pusher.send_event = function (name, data, channel) {
      if (name === "pusher:subscribe" && data && typeof data.channel === "string" && data.channel.charAt(0) !== "#") {
        var position = positions[data.channel];
        var request = {};
        if (position) request.since = { offset: position.offset, epoch: position.epoch };
        var extra = {};
        extra[FIELD] = request;
        data = copy(data, extra);
      }
      return sendEvent.call(pusher, name, data, channel);
    };

    // An app that leaves a channel starts afresh if it comes back.
    var unsubscribe = pusher.unsubscribe;
    pusher.unsubscribe = function (name) {
      delete positions[name];
      return unsubscribe.call(pusher, name);
    };

    // Reads a raw frame before pusher-js does; false: drop it (seen already).
    function take(raw) {
      var frame;
      try {
        frame = JSON.parse(raw);
      } catch (e) {
        return true;
      }
      if (!frame || typeof frame.channel !== "string") return true;
      var name = frame.channel;
      if (frame.event === SUCCEEDED) {
        var data = frame.data;
        if (typeof data === "string") {
          try {
            data = JSON.parse(data);
          } catch (e) {
            return true;
          }
        }
        if (data && isPosition(data[FIELD]) && subscribed(name)) {
          // The position right before the next event of this subscription.
          positions[name] = { offset: data[FIELD].offset, epoch: data[FIELD].epoch };
        }
        return true;
      }
      var position = frame[FIELD];
      if (!isPosition(position)) return true;
      var last = positions[name];
      if (last && last.epoch === position.epoch && position.offset <= last.offset) return false;
      if (subscribed(name)) positions[name] = { offset: position.offset, epoch: position.epoch };
      // A skip holds only a position (an event that left this connection out).
      return frame.event !== SKIP;
    }

    function hook() {
      var connection = pusher.connection.connection;
      var transport = connection && connection.transport;
      if (!transport || transport.__pushieRecovery) return;
      transport.__pushieRecovery = true;
      var emit = transport.emit;
      transport.emit = function (name, event) {
        if (name === "message" && event && typeof event.data === "string" && event.data.indexOf(FIELD) !== -1) {
          if (!take(event.data)) return this;
        }
        return emit.apply(this, arguments);
      };
    }

    // A new transport for every connection; subscriptions are sent once
    // "connected" is told, and their answers come later: in time.
    pusher.connection.bind("connected", hook);
    hook();

    // After pusher-js has told the app pusher:subscription_succeeded.
    pusher.connection.bind("message", function (event) {
      if (event.event !== SUCCEEDED || !event.channel || !event.data) return;
      var info = event.data[FIELD];
      if (!info || typeof info.recovered !== "boolean") return;
      var signal = { recovered: info.recovered, offset: info.offset, epoch: info.epoch };
      var channel = pusher.channel(event.channel);
      if (channel) channel.emit(RECOVERY_EVENT, signal);
      if (typeof options.onRecovery === "function") options.onRecovery(event.channel, signal);
    });

    var handle = {
      position: function (name) {
        var position = positions[name];
        return position ? { offset: position.offset, epoch: position.epoch } : null;
      },
      forget: function (name) {
        delete positions[name];
      },
    };
    pusher.__pushieRecovery = handle;
    return handle;
  }

  return { enable: enable, RECOVERY_EVENT: RECOVERY_EVENT, version: "1" };
});
