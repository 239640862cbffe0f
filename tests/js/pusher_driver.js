#!/usr/bin/env node
/*
 * Drives the real pusher-js client (its Node build) for Pushie's tests.
 *
 * Reads one JSON command per line on stdin and writes one JSON report per line
 * on stdout.  Nothing else ever goes to stdout: pusher-js's own logging and
 * anything printed with console.* go to stderr (set PUSHIE_PUSHER_JS_DEBUG=1
 * to have pusher-js log its protocol traffic there).
 *
 * Commands (see tests/pusher_js.py):
 *   {"cmd":"connect","key":K,"secret":S,"host":H,"port":P,"user_id":..,"user_info":..,
 *    "activityTimeout"?:ms,"pongTimeout"?:ms,"unavailableTimeout"?:ms,"wsPath"?:..}
 *   {"cmd":"connect"}  (no key: reconnect the existing client after a disconnect)
 *   {"cmd":"subscribe","channel":C,"user_id"?:..,"user_info"?:..,"bad_auth"?:bool,
 *    "channel_data"?:raw string,"auth"?:raw string,"auth_error"?:message}
 *   {"cmd":"unsubscribe","channel":C}
 *   {"cmd":"trigger","channel":C,"event":E,"data":D}
 *   {"cmd":"signin","user_id"?:..,"user_info"?:..,"bad_auth"?:bool}
 *   {"cmd":"status"}
 *   {"cmd":"disconnect"}
 *   {"cmd":"exit"}
 * Any command may carry an "id", echoed in its ack.
 *
 * Reports:
 *   {"type":"state","previous":..,"current":..}      every connection state change
 *   {"type":"connected","socket_id":..}
 *   {"type":"connecting_in","seconds":..}             a reconnection was scheduled
 *   {"type":"connection_error","error":..}            pusher.connection "error" events
 *   {"type":"global_event","event":E,"data":D}        pusher.bind_global
 *   {"type":"message","event":E,"channel":C,"data":D,"user_id":U}
 *                                                     every decoded frame after the
 *                                                     handshake, pusher_internal:* included
 *   {"type":"event","channel":C,"event":E,"data":D,"metadata":M}  channel.bind_global
 *   {"type":"triggered","channel":C,"event":E,"ok":bool}
 *   {"type":"user_event","event":E,"data":D}          pusher.user.bind_global
 *   {"type":"watchlist_event","event":E,"data":D}     pusher.user.watchlist.bind_global
 *   {"type":"status",...}                             answer to "status" (channels[C].subscription_count:
 *                                                     pusher-js's channel.subscriptionCount)
 *   {"type":"ack","cmd":..,"ok":bool,"id"?:..}        after every command
 *   {"type":"driver_error","message":..,"cmd"?:..}
 */
'use strict';

const crypto = require('crypto');
const readline = require('readline');
const util = require('util');

// Keep stdout for reports only.
for (const name of ['log', 'info', 'warn', 'error', 'debug', 'trace']) {
  console[name] = (...args) => process.stderr.write(util.format(...args) + '\n');
}

const Pusher = require('pusher-js');
const PUSHER_JS_VERSION = require('pusher-js/package.json').version;

// require('pusher-js') gives a subclass of the core Pusher class; the statics
// (isReady, log, logToConsole) that the library reads live on the core class.
const PusherCore = Object.prototype.hasOwnProperty.call(Pusher, 'isReady') ? Pusher : Object.getPrototypeOf(Pusher);

const DEBUG = process.env.PUSHIE_PUSHER_JS_DEBUG === '1';
PusherCore.logToConsole = false;
PusherCore.log = (message) => {
  if (DEBUG) process.stderr.write('[pusher-js] ' + message + '\n');
};

function debug(...args) {
  if (DEBUG) process.stderr.write('[driver] ' + util.format(...args) + '\n');
}

/** A JSON-safe copy of anything: Errors, cycles, functions, undefined. */
function safe(value, depth = 0, seen = new WeakSet()) {
  if (value === undefined) return null;
  if (value === null || typeof value === 'boolean' || typeof value === 'string') return value;
  if (typeof value === 'number') return Number.isFinite(value) ? value : String(value);
  if (typeof value === 'bigint') return value.toString();
  if (typeof value === 'function' || typeof value === 'symbol') return undefined;
  if (depth > 8) return '[too deep]';
  if (seen.has(value)) return '[circular]';
  seen.add(value);
  try {
    if (value instanceof Error) {
      const out = { name: value.name, message: value.message };
      for (const key of Object.keys(value)) {
        const v = safe(value[key], depth + 1, seen);
        if (v !== undefined) out[key] = v;
      }
      return out;
    }
    if (Array.isArray(value)) {
      return value.map((v) => {
        const s = safe(v, depth + 1, seen);
        return s === undefined ? null : s;
      });
    }
    if (Buffer.isBuffer(value)) return value.toString('utf8');
    const out = {};
    for (const key of Object.keys(value)) {
      const v = safe(value[key], depth + 1, seen);
      if (v !== undefined) out[key] = v;
    }
    return out;
  } finally {
    seen.delete(value);
  }
}

function report(obj) {
  let line;
  try {
    line = JSON.stringify(safe(obj));
  } catch (e) {
    line = JSON.stringify({ type: 'driver_error', message: 'unserializable report: ' + String(e) });
  }
  process.stdout.write(line + '\n');
}

function hmac(secret, text) {
  return crypto.createHmac('sha256', String(secret)).update(text, 'utf8').digest('hex');
}

const WRONG_SECRET = 'not-the-secret-' + crypto.randomBytes(8).toString('hex');

let pusher = null;
let settings = null; // the connect command
const channelOptions = new Map(); // channel name -> the subscribe command
let signinOptions = {};
const boundChannels = new WeakSet();

function channelAuthorizationHandler(params, callback) {
  const { socketId, channelName } = params;
  const options = channelOptions.get(channelName) || {};
  debug('authorizing', channelName, 'for', socketId);
  if (options.auth_error !== undefined && options.auth_error !== null) {
    callback(new Error(String(options.auth_error)), null);
    return;
  }
  const secret = options.bad_auth ? WRONG_SECRET : settings.secret;
  const result = {};
  let signed = socketId + ':' + channelName;
  if (channelName.startsWith('presence-')) {
    let channelData;
    if (typeof options.channel_data === 'string') {
      channelData = options.channel_data;
    } else {
      const userId = 'user_id' in options ? options.user_id : settings.user_id;
      const userInfo = 'user_info' in options ? options.user_info : settings.user_info;
      channelData = JSON.stringify({ user_id: userId, user_info: userInfo });
    }
    result.channel_data = channelData;
    signed += ':' + channelData;
  }
  result.auth = typeof options.auth === 'string' ? options.auth : settings.key + ':' + hmac(secret, signed);
  callback(null, result);
}

function userAuthenticationHandler(params, callback) {
  const { socketId } = params;
  const options = signinOptions;
  debug('signing in', socketId);
  if (options.auth_error !== undefined && options.auth_error !== null) {
    callback(new Error(String(options.auth_error)), null);
    return;
  }
  let userData;
  if (typeof options.user_data === 'string') {
    userData = options.user_data;
  } else {
    const user = {
      id: 'user_id' in options ? options.user_id : settings.user_id,
      user_info: 'user_info' in options ? options.user_info : settings.user_info,
    };
    if (options.watchlist !== undefined) user.watchlist = options.watchlist;
    userData = JSON.stringify(user);
  }
  const secret = options.bad_auth ? WRONG_SECRET : settings.secret;
  const auth = typeof options.auth === 'string' ? options.auth : settings.key + ':' + hmac(secret, socketId + '::user::' + userData);
  callback(null, { auth, user_data: userData });
}

function presenceSummary(members) {
  return { count: members.count, me: members.me, members: members.members };
}

function bindChannel(channel) {
  if (boundChannels.has(channel)) return;
  boundChannels.add(channel);
  // bind_global callbacks get (event, data) only; pusher-js passes the
  // metadata (user_id of presence client events) to bound callbacks as a third
  // emit argument, so catch it on the way through emit.
  let currentMetadata;
  const emit = channel.emit;
  channel.emit = function (eventName, data, metadata) {
    currentMetadata = metadata;
    try {
      return emit.apply(this, arguments);
    } finally {
      currentMetadata = undefined;
    }
  };
  channel.bind_global((eventName, data) => {
    let reported = data;
    if (eventName === 'pusher:subscription_succeeded' && channel.members && data === channel.members) {
      reported = presenceSummary(data);
    }
    report({
      type: 'event',
      channel: channel.name,
      event: eventName,
      data: reported,
      metadata: currentMetadata === undefined ? null : currentMetadata,
    });
  });
}

function requirePusher() {
  if (!pusher) throw new Error('not connected: send a connect command first');
  return pusher;
}

function createPusher(command) {
  settings = command;
  const options = {
    cluster: command.cluster || 'mt1',
    wsHost: command.host || '127.0.0.1',
    wsPort: command.port,
    forceTLS: false,
    enabledTransports: ['ws'],
    disableStats: true,
    channelAuthorization: { customHandler: channelAuthorizationHandler },
    userAuthentication: { customHandler: userAuthenticationHandler },
  };
  for (const name of ['activityTimeout', 'pongTimeout', 'unavailableTimeout', 'wsPath']) {
    if (command[name] !== undefined && command[name] !== null) options[name] = command[name];
  }
  // The constructor connects at once when Pusher.isReady (always so in Node);
  // hold that back until the listeners are bound, so that the first
  // initialized -> connecting change is reported too.
  const wasReady = PusherCore.isReady;
  PusherCore.isReady = false;
  let client;
  try {
    client = new Pusher(command.key, options);
  } finally {
    PusherCore.isReady = wasReady;
  }
  const connection = client.connection;
  connection.bind('state_change', (states) => {
    report({ type: 'state', previous: states.previous, current: states.current });
  });
  connection.bind('connected', () => {
    report({ type: 'connected', socket_id: connection.socket_id });
  });
  connection.bind('connecting_in', (seconds) => {
    report({ type: 'connecting_in', seconds });
  });
  connection.bind('error', (error) => {
    report({ type: 'connection_error', error });
  });
  connection.bind('message', (event) => {
    report({
      type: 'message',
      event: event.event,
      channel: event.channel === undefined ? null : event.channel,
      data: event.data,
      user_id: event.user_id === undefined ? null : event.user_id,
    });
  });
  client.bind_global((eventName, data) => {
    report({ type: 'global_event', event: eventName, data });
  });
  client.user.bind_global((eventName, data) => {
    report({ type: 'user_event', event: eventName, data });
  });
  client.user.watchlist.bind_global((eventName, data) => {
    report({ type: 'watchlist_event', event: eventName, data });
  });
  return client;
}

function status() {
  const channels = {};
  if (pusher) {
    for (const channel of pusher.allChannels()) {
      channels[channel.name] = {
        subscribed: channel.subscribed,
        pending: channel.subscriptionPending,
        cancelled: channel.subscriptionCancelled,
        members: channel.members ? presenceSummary(channel.members) : null,
        // The last pusher:subscription_count pusher-js took (null: none yet).
        subscription_count: channel.subscriptionCount === undefined ? null : channel.subscriptionCount,
      };
    }
  }
  return {
    type: 'status',
    state: pusher ? pusher.connection.state : null,
    socket_id: pusher ? pusher.connection.socket_id || null : null,
    channels,
    user: pusher ? pusher.user.user_data : null,
    version: PUSHER_JS_VERSION,
  };
}

let exiting = false;

function exit(code) {
  if (exiting) return;
  exiting = true;
  try {
    if (pusher) pusher.disconnect();
  } catch (e) {
    process.stderr.write('disconnect on exit failed: ' + String(e) + '\n');
  }
  // Let the close frame and the last reports go out.
  setTimeout(() => process.exit(code), 50);
}

const handlers = {
  connect(command) {
    if (command.key === undefined || command.key === null) {
      requirePusher().connect();
      return;
    }
    if (pusher) {
      pusher.disconnect();
      pusher = null;
    }
    channelOptions.clear();
    signinOptions = {};
    pusher = createPusher(command);
    pusher.connect();
  },
  subscribe(command) {
    const client = requirePusher();
    channelOptions.set(command.channel, command);
    const channel = client.subscribe(command.channel);
    bindChannel(channel);
  },
  unsubscribe(command) {
    requirePusher().unsubscribe(command.channel);
  },
  trigger(command) {
    const channel = requirePusher().channel(command.channel);
    if (!channel) throw new Error('no channel ' + command.channel + ': subscribe first');
    const ok = channel.trigger(command.event, command.data);
    report({ type: 'triggered', channel: command.channel, event: command.event, ok });
  },
  signin(command) {
    const client = requirePusher();
    const { cmd, id, ...options } = command;
    signinOptions = options;
    client.signin();
  },
  status() {
    report(status());
  },
  disconnect() {
    requirePusher().disconnect();
  },
  exit() {
    exit(0);
  },
};

function handle(line) {
  if (!line.trim()) return;
  let command;
  try {
    command = JSON.parse(line);
  } catch (e) {
    report({ type: 'driver_error', message: 'bad JSON command: ' + e.message, line });
    return;
  }
  const name = command && command.cmd;
  const ack = { type: 'ack', cmd: name === undefined ? null : name, ok: true };
  if (command && command.id !== undefined) ack.id = command.id;
  const handler = Object.prototype.hasOwnProperty.call(handlers, name) ? handlers[name] : null;
  try {
    if (!handler) throw new Error('unknown command: ' + JSON.stringify(name));
    handler(command);
  } catch (e) {
    ack.ok = false;
    const message = e instanceof Error ? e.message : String(e);
    process.stderr.write('driver error on ' + line + ': ' + (e instanceof Error ? e.stack : message) + '\n');
    report({ type: 'driver_error', cmd: ack.cmd, message });
  }
  report(ack);
}

process.on('uncaughtException', (e) => {
  report({ type: 'driver_error', message: 'uncaught: ' + (e && e.message ? e.message : String(e)), stack: e && e.stack });
});
process.on('unhandledRejection', (e) => {
  report({ type: 'driver_error', message: 'unhandled rejection: ' + (e && e.message ? e.message : String(e)) });
});
process.stdout.on('error', () => process.exit(0)); // the reader went away

const input = readline.createInterface({ input: process.stdin, terminal: false });
input.on('line', handle);
input.on('close', () => exit(0));
report({ type: 'ready', version: PUSHER_JS_VERSION, node: process.version });
