# -*- test-case-name: tests.test_redis -*-
"""
The Redis engine: any number of Pushie daemons sharing one Redis serve the
same channels, with the same offsets, history, presence and idempotency keys.

Storage, per channel C{c} (all keys and pub/sub names start with
C{pushie:<db>:}; C{c} is the Hub's channel name, which for a Pusher app other
than the first is C{<app id>|<name>}):

  - C{meta:c}      hash: C{offset}, C{epoch}, C{ms} (last history id time);
                   expires with the history, so an epoch changes exactly when a
                   channel's history is lost.
  - C{hist:c}      stream of envelopes, id C{<ms>-<offset>}; trimmed to
                   C{history_size} entries and to C{history_ttl} seconds, by
                   the daemon that publishes (so with daemons of different
                   settings, the publishing daemon's settings win).
  - C{ikey:<n>:c:k} the first offset and epoch of idempotency key C{k},
                   5 minutes; C{<n>} is the length of C{c} in bytes, so that
                   no (channel, key) pair can spell another's key (keys are any
                   string, and channel names may contain C{:}).  Earlier
                   daemons used C{idem:c:k}, which collided; those keys are
                   not read after an upgrade (they expire; a retry across the
                   upgrade, or across old and new daemons in a rolling one,
                   within 5 minutes may publish twice).
  - C{pres:c}      hash C{<node>/<client>} -> member JSON: presence, one field
                   per connection on any node (node ids are hex, so the first
                   C{/} ends it).
  - C{node:<id>}   a node's heartbeat; presence fields of nodes whose
                   heartbeat has expired are swept, with a C{leave}.
  - C{pub:<id>:<n>} the answers of publish C{n} of node C{id}, written by
                   the publish script itself, for a few seconds (see
                   L{PUBLISH_ID_TTL}): a repeated call finds them.
  - pub/sub C{m:c} (publications) and C{p:c} (presence events).

Cluster-wide counts and transitions (see "Counts" and "Transitions" below):

  - C{occ:c}       hash node id -> that node's subscriptions of C{c}; a
                   channel is occupied while it has a field.
  - C{chans}       set of the occupied channels (for C{GET /channels}).
  - C{nodes}       set of the node ids that may hold fields anywhere;
                   C{nchan:<id>} set of the channels a node holds (counts
                   or presence fields), so its death can be swept.
  - C{nstat}       hash node id -> C{"<connections> <subscriptions>"}, written
                   at each heartbeat (the cluster gauges).
  - C{hooks}       C{"<debounce ms> <stream bound>"} while a node delivers
                   webhooks (expires with its heartbeat); without it no
                   transition is recorded.
  - C{hookheld}    zset of held transitions (C{channel_vacated},
                   C{member_removed}), score = due time in ms.
  - C{hookq}       stream of decided transitions (field C{e}: a JSON array
                   C{[name, channel]} or C{[name, channel, user id]}),
                   consumer group C{hooks}, one consumer per node id;
                   C{MAXLEN ~} the stream bound; settled entries are deleted.
  - C{hookdead}    hash: a consumer whose node heartbeat is gone -> since
                   when (ms, Redis's clock; 0: it stopped); see L{CLAIM_SCRIPT}.

Every name is C{<kind>:} then one channel name, except C{ikey}, C{node},
C{pub}, C{nchan} and the bare names above (which have no C{:}); kinds are
fixed words without C{:}, so names of different kinds or channels never meet.

One Lua script publishes a whole request (offset, history, idempotency key and
PUBLISH to the nodes) atomically, so a C{200} means stored and on its way.
The script stores and publishes the finished envelope, but does not write
it: the offset is assigned inside the script, so Python sends the envelope
from L{pushie.wire.envelope_parts} (the one builder) around its two holes,
offset and epoch, and the script fills them.  Finished envelopes, not data
and fields to assemble, because they are what every node and every history
read needs as they are (no node re-encodes what another published), and
because history and pub/sub keep the format of earlier daemons: what they
stored stays readable, and they read what this one publishes.  What the
nodes need and subscribers must not see (L{PublishRequest.meta}) travels on
pub/sub in a header before the envelope (L{meta_header}), never in history.
Each call carries a publish id: when its answer is lost (connection dropped,
timeout), the same call is sent again and either finds the answers of the run
that happened or publishes now, so the request still gets an honest C{200};
C{503 engine_unavailable} means the script was never run, and only when the
question cannot be settled within C{redis_timeout} more does the answer say
C{503 outcome_unknown}.  Nodes SUBSCRIBE only to the channels they
have local subscribers for (C{m:c} for messages, C{p:c} for presence), and
re-subscribe after a reconnect (txredisapi does not).  After any gap in a
channel's live stream (a reconnect, a lost message) the node reads the missing
offsets from history before dispatching more, so live subscribers see no gap
either; when history no longer has them, the subscribers are told to
resubscribe (and learn C{recovered: false}).

Redis may lose writes that were acknowledged and handed on: a Sentinel
failover promotes a replica that lacked the last ones (replication is
asynchronous), a restart reads an AOF file without its last second.  The
channel's offset then goes back, and new publications reuse offsets the
nodes already dispatched, with other content: they must not be dropped as
duplicates, nor may a client recover across them.  So a node remembers the
envelope it dispatched last per channel (C{_last_envelope}); a resync (after
every reconnect, and for a live publication at an offset already dispatched
that is not that envelope) checks that the channel is not behind it and
that history holds that very envelope at its offset (L{_went_back}).  When
not, L{MOVE_EPOCH_SCRIPT} moves the channel to a new epoch, compare-and-set
on the old one so that it happens once however many nodes find it, and
publishes a mark (an envelope at offset 0, never dispatched) so that every
node's subscribers are told, not only this node's.  Another node may publish
on the new primary before this one resyncs; the content check catches that
while the entry is in history (with it trimmed, the resync reports the gap
as lost continuity on its own).  What was published in the old epoch after
the loss goes with it (its subscribers are told).  What is left: a client
that resubscribes on another node (one that did not dispatch the lost
offsets) before any node found the loss may be told C{recovered: true}; it
is told to recover as soon as a node that dispatched them finds it (the
mark reaches its node).  Should every such node be gone, nobody can tell.

With a C{redis+sentinel://} URL the connections come from
L{SentinelEndpoint}, which asks the sentinels for the primary on every
attempt, and each new connection checks C{ROLE} (L{_when_primary}); the
reconnecting pools do the rest.  With C{wait_replicas}, a publish runs
C{WAIT} after the script on the same connection (L{_wait_for_replicas}).

B{Counts.}  The Hub tells the engine its subscriptions per channel at every
change (L{RedisEngine.local_count}); the channels that changed in a reactor
turn go to Redis together at its end, in one L{COUNTS_SCRIPT} call (one call
at a time, so counts land in order).  A count read (L{RedisEngine.counts})
adds the other live nodes' fields to this node's own, which it knows to the
moment: another node's subscription counts a reactor turn (plus a Redis round
trip) after it is made.  Fields of nodes whose heartbeat key is gone are not
counted, and are swept by the next heartbeat of any live node (L{BEAT_SCRIPT}).
Each heartbeat also compares what Redis holds of this node with what it
knows, and sends every count again when Redis lost some (a restart, or this
node taken for dead after a long pause).

B{Transitions.}  Whether a channel or a member comes or goes for the whole
cluster is decided inside the scripts that change the counts and presence
(L{COUNTS_SCRIPT}, L{PRESENCE_ADD_SCRIPT}, L{PRESENCE_REMOVE_SCRIPT}, and the
sweeps of L{PRESENCE_LIST_SCRIPT} and L{BEAT_SCRIPT}), so each transition is
decided exactly once however nodes race.  A first (occupied, added) goes to
the stream C{hookq} at once, unless it undoes a held last of the same channel
(and member), which is then dropped: a channel vacated on node A and occupied
on node B within the debounce is no event.  A last (vacated, removed) waits
in C{hookheld} until due; the deciding node moves it to the stream then
(L{DUE_SCRIPT}), and any node's heartbeat does too, so a held transition is
sent even if the node that decided it dies.  Nodes read the stream in the
consumer group C{hooks} on a connection of their own (a blocking
C{XREADGROUP}), no more than their sink has room for, and acknowledge and
delete each entry once the sink settles it (delivered or given up).  The
entries pending with a consumer whose node heartbeat has been gone for
L{CLAIM_GRACE} are claimed by a live node (L{CLAIM_SCRIPT}, at its heartbeat)
and delivered again: at least once.  The grace keeps a live node's entries
its own after an outage of Redis longer than the heartbeat TTL (when every
heartbeat has expired); a node that stops leaves its entries to be claimed
at once (L{GONE_SCRIPT}).  The stream is bounded (C{MAXLEN ~} the sink's queue bound): past it,
when no node has delivered for long, the oldest undelivered transitions are
trimmed and lost.  Transitions are recorded only while some node delivers
webhooks (the C{hooks} key): give every node the same webhook settings.
"""

from __future__ import annotations

import itertools
import json
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import attr
import txredisapi
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from zope.interface import implementer

from pushie.channels import is_presence
from pushie.engines import ClusterFigures, EngineListener, IEngine, TransitionSink
from pushie.engines.memory import IDEMPOTENCY_WINDOW, new_epoch
from pushie.errors import EngineUnavailable, OutcomeUnknown
from pushie.logs import Throttle
from pushie.records import (
    NO_META,
    ChannelState,
    History,
    Member,
    PresenceEvent,
    Publication,
    PublishRequest,
    Transition,
    history_after,
)
from pushie.wire import dumps, envelope_parts, message_envelope

log = Logger()

RESYNC_RETRY = 0.5
HEARTBEAT_INTERVAL = 2.0
HEARTBEAT_TTL = 6
"""A crashed node's presence members disappear within HEARTBEAT_TTL + HEARTBEAT_INTERVAL seconds."""
PUBLISH_RETRY = 0.1
"""Seconds between tries to settle a publish whose answer was lost (waiting for a connection)."""
PUBLISH_ID_TTL = 10
"""
Seconds (at least; 4 x redis_timeout when longer) that Redis remembers a
publish id and its answers: longer than any copy of one call may still run,
as retries are sent within 2 x redis_timeout of the first.
"""

COUNTS_BATCH = 500
"""Channels whose counts go to Redis in one call."""
READ_BATCH = 100
"""Transitions read from the stream at once (a webhook POST carries up to 100 events)."""
READ_BLOCK = 1.0
"""Seconds a blocking read of the transition stream waits for an entry."""
READ_RETRY = 0.5
"""Seconds before reading the transition stream again after a failure (no connection, no group yet)."""
READ_IDLE = 0.1
"""Seconds before asking again whether the sink has room, when it had none."""
CLAIM_GRACE = HEARTBEAT_TTL + 2 * HEARTBEAT_INTERVAL
"""
Seconds a consumer's heartbeat must have been gone (from the first claim that
found it gone, by Redis's clock) before its pending transitions are claimed:
longer than a live node takes to beat again once Redis is back after an
outage (reconnection backs off to 5 s, then a heartbeat within
HEARTBEAT_INTERVAL).  See L{CLAIM_SCRIPT}.
"""
DUE_SLACK = 0.05
"""Seconds after a held transition falls due before this node moves it to the stream (the heartbeat also does)."""


def _transition(token: bytes, fields: Any) -> Transition | None:
    """The transition of a stream entry (C{e}: a JSON array name, channel[, user id]); None if unreadable."""
    try:
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        name, channel, *user = json.loads(values[b"e"])
        decided = int(token.split(b"-", 1)[0])  # the entry id: Redis's clock when it was added
        return Transition(str(name), str(channel), str(user[0]) if user else None, token, decided)
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


class _NotSent(Exception):
    """The publish script was not written to any connection: Redis certainly did not run it."""


class _NotReplicated(Exception):
    """The publish script ran, but fewer replicas than C{redis_wait_replicas} acknowledged it in time."""


PUBLISH_SCRIPT = r"""
-- KEYS: the publish id's key, then per request: meta, hist, idem (idem may be "-" for none)
-- ARGV: prefix, history_size, ttl_ms, idem_ttl, publish_id_ttl, then per request:
--       channel, head, middle, tail, idem_key, epoch_candidate, header ('' for none)
-- The envelope is written by Python (pushie.wire.envelope_parts) around two
-- holes that only this script can fill: head .. offset .. middle .. epoch .. tail.
-- The header (the publication's metadata, for the nodes only) goes before it
-- on the pub/sub channel, never into the envelope or history.
-- A call repeated with the same publish id (its answer was lost) returns the
-- first call's answers and publishes nothing again.
local done = redis.call('GET', KEYS[1])
if done then
  local answers = {}
  for answer in string.gmatch(done, '[^\n]+') do answers[#answers + 1] = answer end
  return answers
end
local prefix, size, ttl_ms, idem_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local results = {}
local n = (#KEYS - 1) / 3
for i = 0, n - 1 do
  local meta, hist, idem = KEYS[i * 3 + 2], KEYS[i * 3 + 3], KEYS[i * 3 + 4]
  local a = 6 + i * 7
  local channel, head, middle, tail = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local idem_key, candidate, header = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local seen = false
  if idem ~= '-' then
    local prev = redis.call('GET', idem)
    if prev then
      results[#results + 1] = prev
      seen = true
    end
  end
  if not seen then
    local epoch = redis.call('HGET', meta, 'epoch')
    if not epoch then
      epoch = candidate
      redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
    end
    local offset = redis.call('HINCRBY', meta, 'offset', 1)
    local envelope = head .. offset .. middle .. cjson.encode(epoch) .. tail
    if size > 0 then
      local last_ms = tonumber(redis.call('HGET', meta, 'ms') or '0')
      local ms = math.max(now_ms, last_ms)
      redis.call('HSET', meta, 'ms', ms)
      redis.call('XADD', hist, 'MAXLEN', size, ms .. '-' .. offset, 'e', envelope)
      redis.call('XTRIM', hist, 'MINID', (now_ms - ttl_ms) .. '-0')
      redis.call('PEXPIRE', hist, ttl_ms)
    end
    redis.call('PEXPIRE', meta, ttl_ms)
    local answer = offset .. ' ' .. epoch
    if idem ~= '-' then
      redis.call('SET', idem, answer, 'EX', idem_ttl)
    end
    redis.call('PUBLISH', prefix .. 'm:' .. channel, header .. envelope)
    results[#results + 1] = answer
  end
end
redis.call('SET', KEYS[1], table.concat(results, '\n'), 'EX', tonumber(ARGV[5]))
return results
"""

HISTORY_SCRIPT = r"""
-- KEYS: meta, hist.  ARGV: epoch_candidate, ttl_ms, create (1: create a missing channel)
local meta, hist = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[1]
  if ARGV[3] == '1' then
    redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
    redis.call('PEXPIRE', meta, tonumber(ARGV[2]))
  end
  return {'0', epoch}
end
local offset = redis.call('HGET', meta, 'offset')
local out = {offset, epoch}
if ARGV[4] == '1' then
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('XTRIM', hist, 'MINID', (now_ms - tonumber(ARGV[2])) .. '-0')
  local entries = redis.call('XRANGE', hist, '-', '+')
  for _, entry in ipairs(entries) do
    out[#out + 1] = entry[2][2]
  end
end
return out
"""

EPOCH_MARK_EVENT = "pushie:epoch"
"""The event of the mark (offset 0) that L{MOVE_EPOCH_SCRIPT} publishes; nodes never dispatch it."""

MOVE_EPOCH_SCRIPT = r"""
-- KEYS: meta, hist.  ARGV: expected epoch, new epoch, ttl_ms, pub/sub name, mark (an envelope at offset 0)
-- Compare and set: a node found that Redis lost writes of the channel that
-- it had dispatched (its offset went back, or its history holds other
-- publications); the channel starts again in a new epoch, once, however many
-- nodes found it, and the mark tells every node that the old epoch ended.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch ~= ARGV[1] then return epoch or '' end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'offset', 0)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('PUBLISH', ARGV[4], ARGV[5])
return ARGV[2]
"""

CLUSTER_LUA = r"""
-- Shared by the scripts that decide cluster-wide transitions (prepended to them).
-- Transitions go to the stream 'hookq' only while some node delivers webhooks
-- (the key 'hooks' holds "<debounce ms> <stream bound>", refreshed by its heartbeat).
-- A first (occupied, added) undoes a held last (vacated, removed) of the same
-- channel (and member), and is then no transition at all; a last is held in the
-- zset 'hookheld' until its due time (see DUE in BEAT_SCRIPT).
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function hooks_conf(prefix)
  local value = redis.call('GET', prefix .. 'hooks')
  if not value then return nil end
  local debounce, bound = string.match(value, '^(%d+) (%d+)$')
  return tonumber(debounce), tonumber(bound)
end
local function hook_add(prefix, bound, event)
  redis.call('XADD', prefix .. 'hookq', 'MAXLEN', '~', bound, '*', 'e', event)
end
local function hook_first(prefix, event, opposite)
  local debounce, bound = hooks_conf(prefix)
  if not debounce then return end
  if redis.call('ZREM', prefix .. 'hookheld', opposite) == 1 then return end
  hook_add(prefix, bound, event)
end
local function hook_last(prefix, event)
  local debounce, bound = hooks_conf(prefix)
  if not debounce then return end
  if debounce <= 0 then
    hook_add(prefix, bound, event)
  else
    redis.call('ZADD', prefix .. 'hookheld', 'NX', now_ms() + debounce, event)
  end
end
local function occupancy(name, channel) return cjson.encode({name, channel}) end
local function membership(name, channel, user) return cjson.encode({name, channel, tostring(user)}) end
local function alive(prefix, cache, node)
  if cache[node] == nil then cache[node] = redis.call('EXISTS', prefix .. 'node:' .. node) == 1 end
  return cache[node]
end
-- Remove the presence fields of dead nodes from a channel: a 'leave' to the
-- nodes and a member_removed for each member left with no connection.
-- Returns the members left (one JSON value per member id).
local function sweep_presence(prefix, channel, cache)
  local pres = prefix .. 'pres:' .. channel
  local fields = redis.call('HGETALL', pres)
  local removed = {}
  for i = 1, #fields, 2 do
    local node = string.match(fields[i], '^([^/]+)/')
    if node and not alive(prefix, cache, node) then
      redis.call('HDEL', pres, fields[i])
      removed[#removed + 1] = fields[i + 1]
    end
  end
  local members, seen = {}, {}
  for _, value in ipairs(redis.call('HVALS', pres)) do
    local id = cjson.decode(value)['id']
    if not seen[id] then
      seen[id] = true
      members[#members + 1] = value
    end
  end
  local told = {}
  for _, value in ipairs(removed) do
    local id = cjson.decode(value)['id']
    if not seen[id] and not told[id] then
      told[id] = true
      redis.call('PUBLISH', prefix .. 'p:' .. channel, '{"kind":"leave","channel":' .. cjson.encode(channel) ..
        ',"member":' .. value .. ',"origin":null}')
      hook_last(prefix, membership('member_removed', channel, id))
    end
  end
  return members
end
"""

PRESENCE_ADD_SCRIPT = (
    CLUSTER_LUA
    + r"""
-- KEYS: pres, this node's heartbeat key.  ARGV: field, member_json, member_id,
-- pubsub channel, event_json, heartbeat ttl, prefix, channel, node
redis.call('SET', KEYS[2], '1', 'EX', tonumber(ARGV[6]))
redis.call('SADD', ARGV[7] .. 'nodes', ARGV[9])
redis.call('SADD', ARGV[7] .. 'nchan:' .. ARGV[9], ARGV[8])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local count = 0
for _, value in ipairs(redis.call('HVALS', KEYS[1])) do
  if cjson.decode(value)['id'] == ARGV[3] then count = count + 1 end
end
if count == 1 then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  hook_first(ARGV[7], membership('member_added', ARGV[8], ARGV[3]), membership('member_removed', ARGV[8], ARGV[3]))
end
return count
"""
)

PRESENCE_REMOVE_SCRIPT = (
    CLUSTER_LUA
    + r"""
-- KEYS: pres.  ARGV: field, member_id, pubsub channel, event_json, prefix, channel
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
for _, other in ipairs(redis.call('HVALS', KEYS[1])) do
  if cjson.decode(other)['id'] == ARGV[2] then return 1 end
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
hook_last(ARGV[5], membership('member_removed', ARGV[6], ARGV[2]))
return 1
"""
)

PRESENCE_LIST_SCRIPT = (
    CLUSTER_LUA
    + r"""
-- ARGV: prefix, channel.  Sweeps the fields of nodes whose heartbeat expired
-- (see sweep_presence), then returns the member JSON values.
return sweep_presence(ARGV[1], ARGV[2], {})
"""
)

COUNTS_SCRIPT = (
    CLUSTER_LUA
    + r"""
-- ARGV: prefix, node, heartbeat ttl, then pairs channel, count: this node's
-- subscriptions per channel now (0: none).  The first count of a channel
-- anywhere occupies it, the last one gone vacates it.
local prefix, node = ARGV[1], ARGV[2]
redis.call('SET', prefix .. 'node:' .. node, '1', 'EX', tonumber(ARGV[3]))
redis.call('SADD', prefix .. 'nodes', node)
local held = prefix .. 'nchan:' .. node
for i = 4, #ARGV, 2 do
  local channel, count = ARGV[i], tonumber(ARGV[i + 1])
  local occ = prefix .. 'occ:' .. channel
  if count > 0 then
    if redis.call('HSET', occ, node, count) == 1 then
      redis.call('SADD', held, channel)
      if redis.call('HLEN', occ) == 1 then
        redis.call('SADD', prefix .. 'chans', channel)
        hook_first(prefix, occupancy('channel_occupied', channel), occupancy('channel_vacated', channel))
      end
    end
  elseif redis.call('HDEL', occ, node) == 1 then
    redis.call('SREM', held, channel)
    if redis.call('HLEN', occ) == 0 then
      redis.call('SREM', prefix .. 'chans', channel)
      hook_last(prefix, occupancy('channel_vacated', channel))
    end
  end
end
return 1
"""
)

BEAT_SCRIPT = (
    CLUSTER_LUA
    + r"""
-- ARGV: prefix, node, heartbeat ttl, connections, subscriptions, hooks
-- ('<debounce ms> <stream bound>' when this node delivers webhooks, else '').
-- The heartbeat, then what any live node may do for the cluster, atomically
-- (so exactly once): sweep the nodes whose heartbeat expired (their counts and
-- presence fields go, with the transitions that makes), move the held
-- transitions that are due to the stream.  Returns the channels this node is
-- known to hold, then the cluster's live nodes, connections, subscriptions
-- and occupied channels.
local prefix, node = ARGV[1], ARGV[2]
local ttl = tonumber(ARGV[3])
redis.call('SET', prefix .. 'node:' .. node, '1', 'EX', ttl)
redis.call('SADD', prefix .. 'nodes', node)
redis.call('HSET', prefix .. 'nstat', node, ARGV[4] .. ' ' .. ARGV[5])
if ARGV[6] ~= '' then
  redis.call('SET', prefix .. 'hooks', ARGV[6], 'EX', ttl)
  redis.pcall('XGROUP', 'CREATE', prefix .. 'hookq', 'hooks', '0', 'MKSTREAM')
end
local cache = {}
local nodes, connections, subscriptions = 0, 0, 0
for _, other in ipairs(redis.call('SMEMBERS', prefix .. 'nodes')) do
  if alive(prefix, cache, other) then
    nodes = nodes + 1
    local figures = redis.call('HGET', prefix .. 'nstat', other)
    if figures then
      local c, s = string.match(figures, '^(%d+) (%d+)$')
      connections = connections + tonumber(c)
      subscriptions = subscriptions + tonumber(s)
    end
  else
    local held = prefix .. 'nchan:' .. other
    for _, channel in ipairs(redis.call('SMEMBERS', held)) do
      local occ = prefix .. 'occ:' .. channel
      if redis.call('HDEL', occ, other) == 1 and redis.call('HLEN', occ) == 0 then
        redis.call('SREM', prefix .. 'chans', channel)
        hook_last(prefix, occupancy('channel_vacated', channel))
      end
      sweep_presence(prefix, channel, cache)
    end
    redis.call('DEL', held)
    redis.call('HDEL', prefix .. 'nstat', other)
    redis.call('SREM', prefix .. 'nodes', other)
  end
end
local debounce, bound = hooks_conf(prefix)
if debounce then
  local due = redis.call('ZRANGEBYSCORE', prefix .. 'hookheld', '-inf', now_ms(), 'LIMIT', 0, 1000)
  for _, event in ipairs(due) do
    redis.call('ZREM', prefix .. 'hookheld', event)
    hook_add(prefix, bound, event)
  end
end
return {redis.call('SCARD', prefix .. 'nchan:' .. node), nodes, connections, subscriptions,
  redis.call('SCARD', prefix .. 'chans')}
"""
)

DUE_SCRIPT = (
    CLUSTER_LUA
    + r"""
-- ARGV: prefix.  Move the held transitions that are due to the stream.
local debounce, bound = hooks_conf(ARGV[1])
if not debounce then return 0 end
local due = redis.call('ZRANGEBYSCORE', ARGV[1] .. 'hookheld', '-inf', now_ms(), 'LIMIT', 0, 1000)
for _, event in ipairs(due) do
  redis.call('ZREM', ARGV[1] .. 'hookheld', event)
  hook_add(ARGV[1], bound, event)
end
return #due
"""
)

CLUSTER_COUNTS_SCRIPT = (
    CLUSTER_LUA
    + r"""
-- ARGV: prefix, node, mode ('c': the channels that follow; 'p': every occupied
-- channel starting with the next argument), then names or the prefix.
-- Returns channel, count pairs: the subscriptions of live nodes other than
-- this one (the caller adds its own, which it knows better).
local prefix, me, mode = ARGV[1], ARGV[2], ARGV[3]
local names = {}
if mode == 'c' then
  for i = 4, #ARGV do names[#names + 1] = ARGV[i] end
else
  local start = ARGV[4]
  for _, channel in ipairs(redis.call('SMEMBERS', prefix .. 'chans')) do
    if string.sub(channel, 1, #start) == start then names[#names + 1] = channel end
  end
end
local cache, out = {}, {}
for _, channel in ipairs(names) do
  local fields = redis.call('HGETALL', prefix .. 'occ:' .. channel)
  local n = 0
  for j = 1, #fields, 2 do
    if fields[j] ~= me and alive(prefix, cache, fields[j]) then n = n + tonumber(fields[j + 1]) end
  end
  out[#out + 1] = channel
  out[#out + 1] = n
end
return out
"""
)

CLAIM_SCRIPT = r"""
-- ARGV: prefix, node, count, grace (ms).  Claim (for this node) up to count
-- transitions pending with consumers whose node heartbeat has been gone for
-- at least grace, as Redis's clock measures it from the first claim that
-- found it gone (the hash 'hookdead': consumer -> that time; 0 for a node
-- that stopped).  An expired heartbeat alone is not enough: after an outage
-- of Redis longer than the heartbeat TTL every node's heartbeat has expired
-- when it comes back, and a live node delivering an entry at that moment
-- (its reader may be back before its heartbeat) must not lose it to another
-- node: it beats again well within grace.  Nor is an entry's idle time
-- enough: it counts the outage too.  A consumer seen alive again is struck
-- from 'hookdead'; one whose node is gone and that holds nothing is
-- forgotten.  A node that dies is claimed from within heartbeat TTL +
-- heartbeat interval + grace + heartbeat interval (the claiming node's own
-- heartbeats run this script).
local prefix, me, count, grace = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local stream, dead = prefix .. 'hookq', prefix .. 'hookdead'
if redis.call('EXISTS', stream) == 0 then return {} end
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', stream, 'hooks')
if not ok then return {} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local claimed, seen = {}, {}
for _, consumer in ipairs(consumers) do
  local name, held = nil, 0
  for i = 1, #consumer, 2 do
    if consumer[i] == 'name' then name = consumer[i + 1] elseif consumer[i] == 'pending' then held = consumer[i + 1] end
  end
  if name and name ~= me then
    if redis.call('EXISTS', prefix .. 'node:' .. name) == 1 then
      redis.call('HDEL', dead, name)
    elseif held == 0 then
      redis.call('XGROUP', 'DELCONSUMER', stream, 'hooks', name)
      redis.call('HDEL', dead, name)
    else
      seen[name] = true
      local since = tonumber(redis.call('HGET', dead, name))
      if not since then
        redis.call('HSET', dead, name, now)
      elseif now - since >= grace and #claimed < count then
        local ids = {}
        for _, entry in ipairs(redis.call('XPENDING', stream, 'hooks', '-', '+', count - #claimed, name)) do
          ids[#ids + 1] = entry[1]
        end
        if #ids > 0 then
          for _, entry in ipairs(redis.call('XCLAIM', stream, 'hooks', me, 0, unpack(ids))) do
            claimed[#claimed + 1] = entry
          end
        end
      end
    end
  end
end
for _, name in ipairs(redis.call('HKEYS', dead)) do
  if not seen[name] then redis.call('HDEL', dead, name) end
end
if redis.call('EXISTS', dead) == 1 then redis.call('PEXPIRE', dead, 6 * grace) end
return claimed
"""

GONE_SCRIPT = r"""
-- ARGV: prefix, node.  This node stops: its heartbeat goes, and what it
-- leaves pending may be claimed at the next claim (no grace: it is not coming back).
redis.call('DEL', ARGV[1] .. 'node:' .. ARGV[2])
redis.call('HSET', ARGV[1] .. 'hookdead', ARGV[2], 0)
redis.call('PEXPIRE', ARGV[1] .. 'hookdead', 60000)
return 1
"""

SETTLE_SCRIPT = r"""
-- ARGV: prefix, then stream ids: delivered (or given up): acknowledged and deleted,
-- so that the stream holds only what is still to deliver.
local stream = ARGV[1] .. 'hookq'
for i = 2, #ARGV do
  redis.call('XACK', stream, 'hooks', ARGV[i])
  redis.call('XDEL', stream, ARGV[i])
end
return #ARGV - 1
"""


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SENTINEL_PORT = 26379


def parse_redis_url(url: str) -> dict[str, Any]:
    """
    Read C{redis://[:password@]host[:port][/db]} (or C{rediss://} for TLS),
    or C{redis+sentinel://[:password@]host[:port][,host[:port]...]/service[/db]}
    (or C{rediss+sentinel://}): the sentinels to ask for the primary of
    C{service}; the password is the primary's, as with C{redis://}.

    The answer has C{sentinels} (a list of (host, port), empty without
    Sentinel) and C{service} (None without); C{host} and C{port} are the
    first sentinel's with Sentinel.

    @raise ValueError: naming what is wrong.
    """
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme in SENTINEL_SCHEMES:
        return _parse_sentinel_url(url)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(
            f"a Redis engine URL starts with redis://, rediss://, redis+sentinel:// or rediss+sentinel://, not {url!r}"
        )
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("the Redis port must be a number") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError("the Redis database must be a number, as in redis://host:6379/0")
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": port,
        "db": int(path or 0),
        "password": unquote(parts.password) if parts.password else None,
        "username": unquote(parts.username) if parts.username else None,
        "tls": parts.scheme == "rediss",
        "sentinels": [],
        "service": None,
    }


def _parse_sentinel_url(url: str) -> dict[str, Any]:
    """L{parse_redis_url} for C{redis+sentinel://} and C{rediss+sentinel://}."""
    example = "as in redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/0"
    scheme, _, rest = url.partition("://")
    netloc, _, path = rest.partition("/")
    if "?" in path or "#" in path:
        raise ValueError(f"a Sentinel engine URL takes no query or fragment, {example}")
    userinfo, _, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    sentinels = []
    for item in hosts.split(","):
        if not item.strip():
            raise ValueError(f"a Sentinel engine URL names one or more sentinels, host:port comma-separated, {example}")
        one = urlsplit("//" + item.strip())
        try:
            port = one.port or SENTINEL_PORT
        except ValueError:
            raise ValueError(f"a sentinel's port must be a number, not in {item!r}") from None
        if not one.hostname or one.username or one.password:
            raise ValueError(f"not a sentinel address: {item!r}, {example}")
        sentinels.append((one.hostname, port))
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError(f"a Sentinel engine URL names the service (the primary's name in Sentinel), {example}")
    if db and not db.isdigit():
        raise ValueError(f"the Redis database must be a number, {example}")
    return {
        "host": sentinels[0][0],
        "port": sentinels[0][1],
        "db": int(db or 0),
        "password": unquote(password) if password else None,
        "username": unquote(username) if username else None,
        "tls": scheme == "rediss+sentinel",
        "sentinels": sentinels,
        "service": unquote(service),
    }


LEGACY_EXCLUDE = "exclude"
"""The metadata key that the header of an older daemon (C{!<socket id> }) stands for."""


def meta_header(meta: Mapping[str, str]) -> str:
    """
    A publication's metadata as it travels before its envelope on the
    pub/sub channel: C{!} and the pairs form-encoded (no space), then a space;
    empty for none.  Nodes read it with L{read_meta_header}; it never reaches
    history or a subscriber.
    """
    if not meta:
        return ""
    return "!" + urlencode(sorted(meta.items())) + " "


def read_meta_header(header: bytes) -> Mapping[str, str]:
    """
    The metadata of a L{meta_header} (without its space).  Daemons up to
    0.1.0 wrote C{!<socket id>}, with no C{=} (socket ids are digits and a
    dot): read as the socket id to leave out, so that mixed daemons work
    during a rolling upgrade.
    """
    text = header[1:].decode("utf-8", "replace")
    if "=" not in text:
        return {LEGACY_EXCLUDE: text}
    return dict(parse_qsl(text, keep_blank_values=True))


def _command(*parts: str) -> bytes:
    """One Redis command in RESP."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        raw = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """
    Connects to the current primary of a Sentinel service: asks the
    sentinels in turn (C{SENTINEL get-master-addr-by-name}) on every
    connection attempt, then connects to the address the first one that
    knows gives.

    So the engine's reconnecting pools (L{_Factory}) follow a failover with
    no change: Sentinel demotes the old primary and drops its clients, the
    pools connect again, and this asks again.  A sentinel may still name
    the old primary for a moment, or name a server that is not the primary
    yet: the connections check C{ROLE} before they are used
    (L{_when_primary}) and drop a server that is not a primary, and the
    pool tries again.

    @ivar sentinels: (host, port) pairs; the one that answered last is
        asked first next time.
    """

    def __init__(
        self,
        reactor: Any,
        sentinels: list[tuple[str, int]],
        service: str,
        timeout: float,
        password: str | None = None,
        tls: bool = False,
        throttle: Throttle | None = None,
    ) -> None:
        self.reactor = reactor
        self.throttle = throttle
        self.sentinels = list(sentinels)
        self.service = service
        self.timeout = timeout
        self.password = password
        self.tls = tls
        self.primary: tuple[str, int] | None = None

    def _endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = HostnameEndpoint(self.reactor, host, port, timeout=self.timeout)
        if self.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        d = Deferred.fromCoroutine(self.find_primary())
        return d.addCallback(lambda address: self._endpoint(*address).connect(protocolFactory))

    async def find_primary(self) -> tuple[str, int]:
        """
        The address of the primary, from the first sentinel that knows it.

        @raise ConnectError: when none does, saying what each answered.
        """
        problems = []
        for sentinel in list(self.sentinels):
            try:
                answer = await self._ask(*sentinel)
            except Exception as e:  # noqa: BLE001  any failure: ask the next sentinel
                problems.append(f"{sentinel[0]}:{sentinel[1]}: {e.__class__.__name__} {e}".strip())
                continue
            if not isinstance(answer, list) or len(answer) != 2:
                problems.append(f"{sentinel[0]}:{sentinel[1]} knows no primary named {self.service!r}")
                continue
            self.sentinels.remove(sentinel)
            self.sentinels.insert(0, sentinel)
            address = (answer[0].decode(), int(answer[1]))
            if address != self.primary:
                log.info(
                    "Redis Sentinel: the primary of {service} is {host}:{port}",
                    service=self.service,
                    host=address[0],
                    port=address[1],
                )
                self.primary = address
            return address
        message = "no sentinel named the primary: " + "; ".join(problems)
        if self.throttle is not None:
            self.throttle.warn("sentinel_unanswered", "Redis Sentinel: {message}", message=message)
        raise ConnectError(string=message)

    async def _ask(self, host: str, port: int) -> Any:
        protocol = txredisapi.RedisProtocol(charset=None, replyTimeout=self.timeout, convertNumbers=False)
        connecting = connectProtocol(self._endpoint(host, port), protocol)
        await connecting.addTimeout(self.timeout, self.reactor)
        try:
            if self.password is not None:
                await protocol.auth(self.password)
            return await protocol.execute_command("SENTINEL", "get-master-addr-by-name", self.service)
        finally:
            protocol.transport.loseConnection()


def _when_primary(protocol: Any, proceed: Any) -> Deferred[Any]:
    """
    Run C{proceed} (the protocol's own C{connectionMade}: AUTH, SELECT,
    then ready) once C{ROLE} says the server is a primary; else close the
    connection, so that the pool asks the sentinels again.  Without
    Sentinel, C{proceed} at once.
    """
    if not protocol.factory.engine.config["sentinels"]:
        return proceed()  # type: ignore[no-any-return]

    async def check() -> Any:
        try:
            if protocol.password is not None:
                await protocol.auth(protocol.password, protocol.username)
            role = await protocol.role()
        except Exception as e:  # noqa: BLE001  closed or refused (a wrong password...): not usable
            role = e
        if not isinstance(role, list) or not role or role[0] not in (b"master", "master"):
            peer = protocol.transport.getPeer()
            protocol.factory.engine._throttle.warn(
                "sentinel_role",
                "Redis Sentinel named {host}:{port}, which is not a primary (ROLE: {role}): asking again",
                host=getattr(peer, "host", "?"),
                port=getattr(peer, "port", "?"),
                role=role,
            )
            protocol.transport.loseConnection()
            return None
        return await proceed()

    return Deferred.fromCoroutine(check())


class _Subscriber(txredisapi.SubscriberProtocol):
    """
    The node's pub/sub connection: hands messages to the engine, re-subscribes when (re)connected.

    SUBSCRIBE is confirmed per pub/sub name: Redis answers one C{subscribe}
    reply per name, and txredisapi hands them to whichever command waits
    (and drops them when none does), so a SUBSCRIBE of several names could be
    taken as confirmed before its own names were.  Every publication sent
    after the confirmation of a name comes on this connection after it.
    """

    engine: RedisEngine

    def connectionMade(self) -> Deferred[None]:  # type: ignore[override]
        self._confirming: dict[bytes, list[Deferred[None]]] = {}
        d = _when_primary(self, super().connectionMade)
        d.addCallback(lambda _: self.factory.engine._subscriber_ready(self) if self._ready else None)
        return d

    def connectionLost(self, why: Any) -> None:
        waiting, self._confirming = self._confirming, {}
        super().connectionLost(why)
        for waiters in waiting.values():
            for d in waiters:
                d.errback(EngineUnavailable())
        self.factory.engine._subscriber_lost(self)

    def replyReceived(self, reply: Any) -> None:
        if isinstance(reply, list) and len(reply) == 3 and reply[0] in (b"subscribe", b"unsubscribe"):
            waiters = self._confirming.get(reply[1]) if reply[0] == b"subscribe" else None
            if waiters:
                d = waiters.pop(0)
                if not waiters:
                    del self._confirming[reply[1]]
                d.callback(None)
            return
        super().replyReceived(reply)

    def subscribe_names(self, names: list[str]) -> Deferred[None]:
        """SUBSCRIBE; fires once Redis has confirmed every name."""
        waiters = []
        for name in names:
            d: Deferred[None] = Deferred()
            self._confirming.setdefault(name.encode(), []).append(d)
            waiters.append(d)
        self.transport.write(_command("SUBSCRIBE", *names))
        return defer.gatherResults(waiters, consumeErrors=True).addCallback(lambda _: None)

    def unsubscribe_names(self, names: list[str]) -> None:
        self.transport.write(_command("UNSUBSCRIBE", *names))

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self.factory.engine._on_pubsub(channel, message)


class _Commands(txredisapi.RedisProtocol):
    """
    A command connection (of a pool of them): with Sentinel, used only once
    it reaches a primary; once it is ready, the engine checks its health (and
    beats at once when it came up).
    """

    def connectionMade(self) -> Deferred[None]:  # type: ignore[override]
        d = _when_primary(self, super().connectionMade)
        d.addCallback(lambda _: self.factory.engine._note_health())
        return d


class _Factory(txredisapi.RedisFactory):
    """
    A connection pool that never gives up reconnecting on its own.

    txredisapi 1.6 stops reconnecting for good when AUTH or SELECT fails on
    a new connection, and a connection that drops during them counts: a
    Redis shutting down, or a proxy or load balancer that accepts and then
    closes while Redis is away, would leave the daemon answering 503 until
    it is restarted.  The engine closes its pools with C{disconnect()}, which
    does not need this.
    """

    def stopTrying(self) -> Deferred[None]:
        return defer.succeed(None)


@implementer(IEngine)
@attr.s(auto_attribs=True, eq=False)
class RedisEngine:
    """An L{IEngine} backed by one Redis server, shared by every node."""

    url: str
    reactor: Any
    history_size: int = 100
    history_ttl: float = 300.0
    timeout: float = 2.0
    sentinel_password: str | None = None
    """The sentinels' password (C{requirepass} in their configuration), when they have one."""
    wait_replicas: int = 0
    """
    With more than 0: each publish waits (C{WAIT}) until that many replicas
    have it, for up to half of C{timeout}; else it answers C{outcome_unknown}.
    """
    name: str = attr.ib(init=False)
    node: str = attr.ib(factory=lambda: secrets.token_hex(6), init=False)
    _listener: EngineListener | None = attr.ib(default=None, init=False)
    _commands: Any = attr.ib(default=None, init=False)
    _pubsub_factory: Any = attr.ib(default=None, init=False)
    _pubsub: _Subscriber | None = attr.ib(default=None, init=False)
    _watched: dict[str, int] = attr.ib(factory=dict, init=False)
    _last: dict[str, tuple[int, str]] = attr.ib(factory=dict, init=False)
    # The envelope of the last publication dispatched (absent when _last came from a read):
    # what the channel's history must still hold at that offset, or writes were lost (_went_back).
    _last_envelope: dict[str, bytes] = attr.ib(factory=dict, init=False)
    # Per channel, while its history is read back: the live publications that wait.
    _resyncing: dict[str, list[Publication]] = attr.ib(factory=dict, init=False)
    # The resync under way per channel (a token), and the channels to read once more after it.
    _resync_running: dict[str, object] = attr.ib(factory=dict, init=False)
    _resync_again: set[str] = attr.ib(factory=set, init=False)
    # Watched channels whose position was not known when the pub/sub connection came back.
    _unsynced: set[str] = attr.ib(factory=set, init=False)
    # Reads waiting until this node has dispatched up to what they saw: (offset, epoch, Deferred).
    _catching_up: dict[str, list[tuple[int, str, Deferred[None]]]] = attr.ib(factory=dict, init=False)
    _heartbeat: LoopingCall | None = attr.ib(default=None, init=False)
    _was_up: bool | None = attr.ib(default=None, init=False)
    # Publish ids: unique per node, so a repeated script call can be recognised.
    _publish_ids: Any = attr.ib(factory=lambda: itertools.count(1), init=False)
    # Publishes waiting to settle a lost answer, paused until the next try.
    _pauses: set[Deferred[None]] = attr.ib(factory=set, init=False)
    # Counts: this node's subscriptions per channel, the channels whose count Redis
    # has not been told yet, and the one COUNTS_SCRIPT call under way (they go one
    # at a time, so that an older count never lands after a newer one).
    _local: dict[str, int] = attr.ib(factory=dict, init=False)
    _dirty: set[str] = attr.ib(factory=set, init=False)
    _counts_call: Any = attr.ib(default=None, init=False)
    _counting: bool = attr.ib(default=False, init=False)
    cluster: ClusterFigures | None = attr.ib(default=None, init=False)
    """The cluster's figures as of this node's last heartbeat (C{None} before the first)."""
    # Transitions: the sink they go to, the debounce and stream bound, the reader
    # (a connection of its own: it blocks), the transitions handed to the sink and
    # not settled yet (stream id -> None), settlements Redis has not confirmed.
    _sink: TransitionSink | None = attr.ib(default=None, init=False)
    _debounce: float = attr.ib(default=0.0, init=False)
    _backlog: int = attr.ib(default=0, init=False)
    _reader_factory: Any = attr.ib(default=None, init=False)
    _reading: Deferred[None] | None = attr.ib(default=None, init=False)
    _read_own: bool = attr.ib(default=True, init=False)
    _reader_seen: Any = attr.ib(default=None, init=False)
    _holding: dict[bytes, None] = attr.ib(factory=dict, init=False)
    _unsettled: list[bytes] = attr.ib(factory=list, init=False)
    _due_call: Any = attr.ib(default=None, init=False)
    _due_at: float = attr.ib(default=0.0, init=False)
    # The reader's waits (apart from the publishes' _pauses: stopping the reader must not cut those short).
    _naps: set[Deferred[None]] = attr.ib(factory=set, init=False)
    trimmed: int = attr.ib(default=0, init=False)
    """Transitions trimmed from the stream (past its bound) before this node could deliver them."""

    def __attrs_post_init__(self) -> None:
        self.config = parse_redis_url(self.url)
        if self.config["sentinels"]:
            hosts = ",".join(f"{h}:{p}" for h, p in self.config["sentinels"])
            self.name = f"redis+sentinel://{hosts}/{self.config['service']}/{self.config['db']}"
        else:
            self.name = f"redis://{self.config['host']}:{self.config['port']}/{self.config['db']}"
        self.prefix = f"pushie:{self.config['db']}:"
        self._throttle = Throttle(log, self.reactor)

    # -- connections -----------------------------------------------------

    def _endpoint(self) -> Any:
        endpoint: IStreamClientEndpoint
        if self.config["sentinels"]:
            return SentinelEndpoint(
                self.reactor,
                self.config["sentinels"],
                self.config["service"],
                self.timeout,
                self.sentinel_password,
                self.config["tls"],
                self._throttle,
            )
        endpoint = HostnameEndpoint(self.reactor, self.config["host"], self.config["port"], timeout=self.timeout)
        if self.config["tls"]:
            endpoint = wrapClientTLS(optionsForClientTLS(self.config["host"]), endpoint)
        return endpoint

    def _factory(self, protocol: type, poolsize: int, dbid: int | None, reply_timeout: float | None = None) -> Any:
        factory = _Factory(
            None,
            dbid,
            poolsize,
            isLazy=True,
            handler=txredisapi.ConnectionHandler,
            charset=None,
            password=self.config["password"],
            replyTimeout=reply_timeout or self.timeout,
            convertNumbers=False,
            username=self.config["username"],
        )
        factory.protocol = protocol
        if protocol is _Commands or self.config["sentinels"]:
            # A dropped command connection is most often a blip: come back at
            # once (a publish whose answer it lost is settled within
            # redis_timeout), then back off (0.1, 0.3, 0.7, 2, 5 s).  With
            # Sentinel every connection drops at a failover and comes back
            # once the sentinels name the new primary: try 4 times a second, so
            # that the pub/sub connection comes back soon after the command
            # ones (publications made in between are read back from history).
            factory.initialDelay = 0.1
        factory.maxDelay = 0.25 if self.config["sentinels"] else 5
        # The first connection's outcome is also reported here; health and
        # logs come from the connections themselves.
        factory.deferred.addErrback(lambda failure: None)
        factory.engine = self
        factory.startConnecting(self._endpoint())
        return factory

    def start(self, listener: EngineListener) -> Deferred[None]:
        """Connect (in the background: the daemon starts even while Redis is down)."""
        self._listener = listener
        self._commands = self._factory(_Commands, 2, self.config["db"])
        self._pubsub_factory = self._factory(_Subscriber, 1, None)
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = self.reactor
        self._heartbeat.start(HEARTBEAT_INTERVAL, now=True)
        self._start_reading()
        return defer.succeed(None)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """
        Stop: tell Redis this node's last counts, stop taking transitions
        (those handed over and not settled stay pending and are claimed by
        another node at its next heartbeat: L{GONE_SCRIPT}), disconnect.
        """
        self._listener = None
        self._sink = None
        for pause in list(self._pauses):
            pause.cancel()  # their publishes answer outcome_unknown
        for nap in list(self._naps):
            nap.cancel()
        for call in (self._counts_call, self._due_call):
            if call is not None and call.active():
                call.cancel()
        self._counts_call = self._due_call = None
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        if self._commands is not None and self._commands.size:
            for _ in range(100):  # COUNTS_BATCH channels a call
                if not self._dirty or self._counting:
                    break
                yield self._send_counts()
            if self._unsettled:
                yield self._settle_ids([])
            try:
                yield self._call("eval", GONE_SCRIPT, [], [self.prefix, self.node])
            except Exception:  # noqa: BLE001  best effort: the heartbeat expires anyway
                pass
        for factory in (self._commands, self._pubsub_factory, self._reader_factory):
            if factory is not None:
                yield factory.disconnect()
        if self._reading is not None:
            yield self._reading

    def healthy(self) -> bool:
        return bool(
            self._commands is not None and self._commands.size and self._pubsub is not None and self._pubsub.connected
        )

    def _note_health(self) -> None:
        up = self.healthy()
        if up != self._was_up:
            if up:
                log.info("Redis engine connected to {name} (node {node})", name=self.name, node=self.node)
            elif self._was_up is not None:
                log.warn("Lost the Redis connection to {name}: publishing answers 503 until it is back", name=self.name)
            self._was_up = up
            if up and self._heartbeat is not None and self._heartbeat.running:
                # Beat at once: the cluster learns of this node (and of its webhooks) now, not in 2 s.
                self._beat()

    def _run(self, d: Deferred[Any]) -> Deferred[Any]:
        """Bound a command by the engine timeout; map every failure to L{EngineUnavailable}."""
        d.addTimeout(self.timeout, self.reactor)

        def unavailable(failure: Any) -> None:
            raise EngineUnavailable()

        return d.addErrback(unavailable)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        if self._commands is None or not self._commands.size:
            return defer.fail(EngineUnavailable())
        return self._run(getattr(self._commands.handler, method)(*args, **kwargs))

    def _beat(self) -> Deferred[Any] | None:
        """
        Every L{HEARTBEAT_INTERVAL}: refresh this node's heartbeat and figures,
        let Redis sweep dead nodes and send due transitions (L{BEAT_SCRIPT}),
        tell Redis again what it lost of this node's counts, refresh the
        presence of watched presence channels (sweeping dead nodes' members),
        claim the transitions of dead nodes, retry settlements.
        """
        self._note_health()
        if self._commands is None or not self._commands.size:
            return None
        hooks = f"{int(self._debounce * 1000)} {self._backlog}" if self._sink is not None else ""
        connections = self._listener.connection_count() if self._listener is not None else 0
        args = [self.prefix, self.node, HEARTBEAT_TTL, connections, sum(self._local.values()), hooks]
        d = self._call("eval", BEAT_SCRIPT, [], args).addCallback(self._beaten)
        for channel in [c for c in self._watched if is_presence(c)]:
            d.addCallback(lambda _, c: self.presence(c), channel)
        d.addCallback(lambda _: self._claim())
        if self._unsettled:
            d.addCallback(lambda _: self._settle_ids([]))
        d.addErrback(lambda f: None)  # reported by _note_health
        return None

    def _beaten(self, answer: list[Any]) -> None:
        held, nodes, connections, subscriptions, channels = (int(x) for x in answer)
        self.cluster = ClusterFigures(nodes, connections, subscriptions, channels)
        if self._dirty:
            self._schedule_counts()
        elif not self._counting and held < len(self._local):
            # Redis lost some of this node's counts (it restarted, or took this
            # node for dead after a long pause and swept it): tell it all again.
            log.info("Redis does not hold this node's subscription counts: sending them again")
            self._dirty.update(self._local)
            self._schedule_counts()

    # -- counts ----------------------------------------------------------

    def local_count(self, channel: str, count: int) -> None:
        """
        Note this node's subscriptions of C{channel}; Redis is told at the end
        of the reactor turn, for every channel that changed in it, in one
        L{COUNTS_SCRIPT} call (one call at a time, so counts land in order).
        """
        if count > 0:
            self._local[channel] = count
        else:
            self._local.pop(channel, None)
        self._dirty.add(channel)
        self._schedule_counts()

    def _schedule_counts(self) -> None:
        if self._counts_call is None and not self._counting and self._listener is not None:
            self._counts_call = self.reactor.callLater(0, self._send_counts)

    def _send_counts(self) -> Deferred[None]:
        self._counts_call = None
        if self._counting or not self._dirty or self._commands is None or not self._commands.size:
            return defer.succeed(None)  # a call is under way, or Redis is away: the heartbeat tries again
        batch = list(itertools.islice(self._dirty, COUNTS_BATCH))
        self._dirty.difference_update(batch)
        args: list[Any] = [self.prefix, self.node, HEARTBEAT_TTL]
        vacating = False
        for channel in batch:
            count = self._local.get(channel, 0)
            vacating = vacating or count == 0
            args += [channel, count]
        self._counting = True

        def sent(_: object) -> None:
            self._counting = False
            if vacating:
                self._held_one()
            if self._dirty:
                self._schedule_counts()

        def failed(_: object) -> None:
            self._counting = False
            self._dirty.update(batch)  # the current counts go with the heartbeat's retry

        return self._call("eval", COUNTS_SCRIPT, [], args).addCallbacks(sent, failed)

    def counts(self, channels: Sequence[str]) -> Deferred[dict[str, int]]:
        """The other live nodes' counts from Redis, plus this node's own, which it knows to the moment."""
        if not channels:
            return defer.succeed({})
        return self._cluster_counts("c", list(channels)).addCallback(
            lambda others: {c: others.get(c, 0) + self._local.get(c, 0) for c in channels}
        )

    def channel_counts(self, prefix: str) -> Deferred[dict[str, int]]:
        def merged(others: dict[str, int]) -> dict[str, int]:
            for channel, count in self._local.items():
                if channel.startswith(prefix):
                    others[channel] = others.get(channel, 0) + count
            return {c: n for c, n in others.items() if n > 0}

        return self._cluster_counts("p", [prefix]).addCallback(merged)

    def _cluster_counts(self, mode: str, names: list[str]) -> Deferred[dict[str, int]]:
        def pairs(answer: list[Any]) -> dict[str, int]:
            return {answer[i].decode(): int(answer[i + 1]) for i in range(0, len(answer), 2)}

        args = [self.prefix, self.node, mode, *names]
        return self._call("eval", CLUSTER_COUNTS_SCRIPT, [], args).addCallback(pairs)

    # -- transitions -----------------------------------------------------

    def send_transitions(self, sink: TransitionSink | None, debounce: float, backlog: int) -> bool:
        """
        Take cluster-wide transitions from the stream for C{sink}.  See the
        module docstring, "Transitions"; C{backlog} bounds the stream (C{MAXLEN ~}).
        """
        self._sink = sink
        if sink is None:
            for nap in list(self._naps):
                nap.cancel()
            return True
        self._debounce = max(0.0, debounce)
        self._backlog = max(1, backlog)
        self._start_reading()
        return True

    def _start_reading(self) -> None:
        if self._sink is None or self._listener is None:
            return
        if self._reader_factory is None:
            self._reader_factory = self._factory(
                txredisapi.RedisProtocol, 1, self.config["db"], reply_timeout=self.timeout + READ_BLOCK
            )
        if self._reading is None:
            self._reading = Deferred.fromCoroutine(self._read_transitions())
            self._reading.addErrback(lambda f: log.failure("Reading webhook transitions failed", f))

    async def _read_transitions(self) -> None:
        """
        Read transitions for this node's consumer with a blocking
        C{XREADGROUP}, never more than the sink has room for; after a
        (re)connection, first what Redis still counts as delivered to this
        node and the node does not hold (its answer was lost).
        """
        try:
            while self._sink is not None and self._listener is not None:
                room = min(READ_BATCH, self._sink.room())
                connection = self._reader_connection()
                if room <= 0 or connection is None:
                    await self._nap(READ_IDLE if connection is not None else READ_RETRY)
                    continue
                if connection is not self._reader_seen:
                    self._reader_seen = connection  # a new connection: a read's answer may have been lost
                    self._read_own = True
                own = self._read_own
                count = room + len(self._holding) if own else room
                try:
                    reply = await connection.execute_command(
                        "XREADGROUP",
                        "GROUP",
                        "hooks",
                        self.node,
                        "COUNT",
                        count,
                        "BLOCK",
                        int(READ_BLOCK * 1000),
                        "STREAMS",
                        self.prefix + "hookq",
                        "0" if own else ">",
                    )
                except Exception:  # noqa: BLE001  no group yet (the heartbeat makes it), or no connection
                    self._read_own = True
                    if self._sink is None:
                        break  # stopped: the connection was closed under the read
                    await self._nap(READ_RETRY)
                    continue
                self._read_own = False
                self._hand_over(reply[0][1] if reply else [])
        except CancelledError:
            pass
        finally:
            self._reading = None

    def _reader_connection(self) -> Any:
        pool = self._reader_factory.pool if self._reader_factory is not None else []
        for connection in pool:
            if connection.connected:
                return connection
        return None

    async def _nap(self, seconds: float) -> None:
        nap: Deferred[None] = deferLater(self.reactor, seconds)
        self._naps.add(nap)
        try:
            await nap
        finally:
            self._naps.discard(nap)

    def _hand_over(self, entries: list[Any]) -> None:
        """Give the sink the transitions of stream entries it does not hold yet; settle the unreadable."""
        transitions = []
        gone = []
        for entry in entries:
            if not entry:
                continue  # Redis before 7 answers a claim of a trimmed entry with nothing
            token, fields = entry[0], entry[1]
            if token in self._holding:
                continue
            transition = _transition(token, fields)
            if transition is None:
                gone.append(token)  # trimmed while pending, or not ours to read
                continue
            self._holding[token] = None
            transitions.append(transition)
        if gone:
            self.trimmed += len(gone)
            self._throttle.warn(
                "hooks_trimmed",
                "{count} webhook transitions were trimmed from the Redis stream before they could be delivered "
                "(it keeps about webhook_max_queue undelivered ones; {total} so far)",
                count=len(gone),
                total=self.trimmed,
            )
            self._settle_ids(gone)
        if transitions:
            if self._sink is not None:
                self._sink.take(transitions, self._settle)

    def _settle(self, transitions: Sequence[Transition]) -> None:
        """The sink is done with C{transitions}: acknowledge and delete them."""
        self._settle_ids([t.token for t in transitions if t.token in self._holding])

    def _settle_ids(self, ids: list[bytes]) -> Deferred[None]:
        ids = self._unsettled + ids
        self._unsettled = []
        if not ids:
            return defer.succeed(None)

        def done(_: object) -> None:
            for token in ids:
                self._holding.pop(token, None)

        def failed(_: object) -> None:
            self._unsettled.extend(ids)  # tried again at the next heartbeat

        return self._call("eval", SETTLE_SCRIPT, [], [self.prefix, *ids]).addCallbacks(done, failed)

    def _claim(self) -> Deferred[None] | None:
        """Take over what nodes that died left unsettled (as much as the sink has room for)."""
        if self._sink is None:
            return None
        room = min(READ_BATCH, self._sink.room())
        if room <= 0:
            return None
        d = self._call("eval", CLAIM_SCRIPT, [], [self.prefix, self.node, room, int(CLAIM_GRACE * 1000)])

        def claimed(entries: list[Any]) -> None:
            if entries:
                log.info("Took over {count} webhook transitions of a node that is gone", count=len(entries))
                self._hand_over(entries)

        return d.addCallback(claimed)

    def _held_one(self) -> None:
        """A last (vacated, removed) was held in Redis: run L{DUE_SCRIPT} when it falls due."""
        if self._sink is None or self._debounce <= 0 or self._listener is None:
            return
        due = self.reactor.seconds() + self._debounce + DUE_SLACK
        if self._due_call is not None and self._due_call.active():
            self._due_at = max(self._due_at, due)
            return
        self._due_at = due
        self._due_call = self.reactor.callLater(self._debounce + DUE_SLACK, self._run_due)

    def _run_due(self) -> None:
        self._due_call = None
        if self._listener is None:
            return
        self._call("eval", DUE_SCRIPT, [], [self.prefix]).addErrback(lambda f: None)
        left = self._due_at - self.reactor.seconds()
        if left > 0:
            self._due_call = self.reactor.callLater(left, self._run_due)

    # -- keys ------------------------------------------------------------

    def _key(self, kind: str, channel: str) -> str:
        """A key or pub/sub name of one channel: the kind is a fixed word without C{:}, then the name."""
        return f"{self.prefix}{kind}:{channel}"

    def _idempotency_key(self, channel: str, key: str) -> str:
        """
        The key remembering idempotency key C{key} of C{channel}: two
        user-controlled parts, so the channel name goes with its length
        (C{ikey:6:orders:eu:17} is C{orders} + C{eu:17}, C{ikey:9:orders:eu:17}
        is C{orders:eu} + C{17}); no separator could do, as keys are any string.
        """
        return f"{self.prefix}ikey:{len(channel.encode())}:{channel}:{key}"

    # -- publishing ------------------------------------------------------

    def append(self, requests: Sequence[PublishRequest]) -> Deferred[list[Publication]]:
        """
        Publish C{requests} with one run of L{PUBLISH_SCRIPT}, all or none.

        Fails with L{EngineUnavailable} only when Redis certainly did not
        publish (no connection took the script, or Redis refused it), and
        with L{OutcomeUnknown} when the script was sent, its answer was lost
        and asking again did not settle it in time (L{_publish}).
        """
        keys: list[Any] = [f"{self.prefix}pub:{self.node}:{next(self._publish_ids)}"]
        args: list[Any] = [
            self.prefix,
            self.history_size,
            int(self.history_ttl * 1000),
            int(IDEMPOTENCY_WINDOW),
            max(PUBLISH_ID_TTL, math.ceil(4 * self.timeout)),
        ]
        for request in requests:
            idem = (
                "-"
                if request.idempotency_key is None
                else self._idempotency_key(request.channel, request.idempotency_key)
            )
            keys += [self._key("meta", request.channel), self._key("hist", request.channel), idem]
            head, middle, tail = envelope_parts(request.channel, request.event, request.data, request.user_id)
            args += [
                request.channel,
                head,
                middle,
                tail,
                request.idempotency_key or "",
                new_epoch(),
                meta_header(request.meta),
            ]
        d = Deferred.fromCoroutine(self._publish(keys, args))

        def publications(answers: list[bytes]) -> list[Publication]:
            result = []
            for request, answer in zip(requests, answers, strict=True):
                offset, epoch = answer.decode().split(" ", 1)
                result.append(Publication.of(request, int(offset), epoch))
            return result

        return d.addCallback(publications)

    async def _publish(self, keys: list[Any], args: list[Any]) -> list[bytes]:
        """
        Run the publish script; when its answer is lost, run it again with
        the same publish id (C{keys[0]}) until Redis answers or
        C{redis_timeout} more has passed.

        A lost answer (connection lost, or no answer within the timeout)
        says nothing about whether Redis ran the script.  The publish id
        makes the question safe to ask again: a script that already ran
        answers with its first offsets and publishes nothing; one that did
        not run publishes now.  Only a script that was never written to a
        connection, or that Redis answered with an error (busy, loading, out
        of memory, read-only: it refused to run it), certainly published
        nothing.
        """
        try:
            return await self._send_publish(keys, args, self.timeout)
        except _NotSent:
            raise EngineUnavailable() from None
        except txredisapi.ResponseError as e:
            self._throttle.warn("publish_refused", "Redis refused a publish: {error}", error=str(e))
            raise EngineUnavailable() from None
        except Exception:  # noqa: BLE001  sent, and no answer: the outcome is unknown so far
            pass
        deadline = self.reactor.seconds() + self.timeout
        while self._listener is not None:
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                break
            try:
                answers = await self._send_publish(keys, args, remaining)
            except Exception:  # noqa: BLE001  not settled yet: wait for a connection, try again
                pass
            else:
                log.info("Redis's answer to a publish was lost; asked again, settled ({id})", id=keys[0])
                return answers
            pause: Deferred[None]
            pause = deferLater(self.reactor, max(0.0, min(PUBLISH_RETRY, deadline - self.reactor.seconds())))
            self._pauses.add(pause)
            try:
                await pause
            except CancelledError:
                break
            finally:
                self._pauses.discard(pause)
        self._throttle.warn(
            "publish_unsettled",
            "Redis's answer to a publish was lost and could not be settled: outcome unknown ({id})",
            id=keys[0],
        )
        raise OutcomeUnknown()

    def _send_publish(self, keys: list[Any], args: list[Any], timeout: float) -> Deferred[list[bytes]]:
        """
        Write the publish script on a ready command connection; fire with its answer.

        Fails with L{_NotSent} when no connection took it, so that Redis
        certainly did not run it; with a timeout or connection error when it
        was written and no answer came; with C{txredisapi.ResponseError} when
        Redis answered with an error.
        """
        pool = self._commands.pool if self._commands is not None else []
        for connection in pool:
            if connection.connected:
                break
        else:
            return defer.fail(_NotSent())
        try:
            d = connection.eval(PUBLISH_SCRIPT, keys, args)
        except txredisapi.ConnectionError:
            return defer.fail(_NotSent())
        if self.wait_replicas:
            d.addCallback(self._wait_for_replicas, connection, keys[0], timeout)
        return d.addTimeout(timeout, self.reactor)

    def _wait_for_replicas(self, answers: list[bytes], connection: Any, publish_id: str, timeout: float) -> Any:
        """
        C{WAIT} on the connection that ran the script until C{wait_replicas}
        replicas have its writes, for half of C{timeout}; then C{answers}.

        Fails with L{_NotReplicated} when fewer did: the publication is on
        the primary (and on its way to subscribers) but a failover now could
        lose it, so L{_publish} asks again (the same publish id finds the same
        answers and waits again) and, past C{redis_timeout}, answers
        C{outcome_unknown}: a retry with the same idempotency key finds the
        publication if it survived and publishes it again if it did not.
        """
        milliseconds = max(1, int(timeout * 500))

        def acknowledged(count: Any) -> list[bytes]:
            if int(count) < self.wait_replicas:
                self._throttle.warn(
                    "publish_not_replicated",
                    "A publish reached {count} of {wanted} replicas within {ms} ms (redis_wait_replicas): asking again",
                    count=int(count),
                    wanted=self.wait_replicas,
                    ms=milliseconds,
                )
                raise _NotReplicated(publish_id)
            return answers

        return connection.execute_command("WAIT", self.wait_replicas, milliseconds).addCallback(acknowledged)

    def state(self, channel: str) -> Deferred[ChannelState]:
        return self._read(channel, with_history=False).addCallback(lambda h: h.state)

    def history(self, channel: str, since: int, limit: int | None) -> Deferred[History]:
        return self._read(channel, with_history=True).addCallback(lambda h: self._after(h, since, limit))

    def _read(self, channel: str, with_history: bool, wait: bool = True) -> Deferred[History]:
        """
        The channel's state (and history).  With C{wait}, a watched channel's
        answer waits until this node has dispatched up to it (L{_dispatched_up_to}).
        """
        keys = [self._key("meta", channel), self._key("hist", channel)]
        args = [
            new_epoch(),
            int(self.history_ttl * 1000),
            "1" if channel in self._watched else "0",
            "1" if with_history else "0",
        ]

        def parse(answer: list[bytes]) -> History | Deferred[History]:
            state = ChannelState(int(answer[0]), answer[1].decode())
            history = History(state, [Publication.from_envelope(raw) for raw in answer[2:]], True)
            if channel not in self._watched:
                return history
            last = self._last.get(channel)
            if last is None:
                self._last[channel] = (state.offset, state.epoch)
                self._last_envelope.pop(channel, None)
                if channel in self._unsynced:
                    self._unsynced.discard(channel)
                    self._resync(channel)
            elif last[1] == state.epoch and state.offset < last[0]:
                # Behind what this node dispatched: lost writes, or only a
                # publication that overtook this answer; the resync tells.
                self._resync(channel)
            elif wait and not self._reached(last, state.offset, state.epoch):
                return self._dispatched_up_to(channel, state).addCallback(lambda _: history)
            return history

        return self._call("eval", HISTORY_SCRIPT, keys, args).addCallback(parse)

    @staticmethod
    def _reached(last: tuple[int, str], offset: int, epoch: str) -> bool:
        """Whether a node that dispatched up to C{last} has dispatched up to (C{offset}, C{epoch})."""
        return (last[1] == epoch and last[0] >= offset) or (last[1] != epoch and offset == 0)

    def _dispatched_up_to(self, channel: str, state: ChannelState) -> Deferred[None]:
        """
        Fire once this node has dispatched the channel up to C{state}.

        A read of a watched channel answers only then: the Hub takes the
        answer as its subscribers' position, so what Redis had stored but
        this node had not yet dispatched (on its way on the pub/sub
        connection, or waiting for a resync) must reach the Hub first, or its
        older subscribers would never get it.  Past the engine timeout (the
        pub/sub connection is down), L{EngineUnavailable}.
        """
        d: Deferred[None] = Deferred()
        self._catching_up.setdefault(channel, []).append((state.offset, state.epoch, d))
        return self._run(d)

    def _release_readers(self, channel: str, publication: Publication | None) -> None:
        """Answer the reads that waited for C{publication}; with None, fail them all (continuity lost)."""
        waiting = self._catching_up.pop(channel, [])
        left = []
        for offset, epoch, d in waiting:
            if d.called:
                continue
            if publication is None:
                d.errback(EngineUnavailable())
            elif publication.epoch == epoch and publication.offset >= offset:
                d.callback(None)
            else:
                left.append((offset, epoch, d))
        if left:
            self._catching_up[channel] = left

    @staticmethod
    def _after(history: History, since: int, limit: int | None) -> History:
        return history_after(history.state, history.publications, since, limit)

    # -- interest and delivery -------------------------------------------

    def watch(self, channel: str) -> Deferred[None]:
        count = self._watched.get(channel, 0)
        self._watched[channel] = count + 1
        if self._pubsub is None or not self._pubsub.connected:
            return defer.fail(EngineUnavailable())
        if count:
            return defer.succeed(None)
        return self._run(self._pubsub.subscribe_names([self._key("m", channel), self._key("p", channel)]))

    def occupied(self, prefix: str) -> Deferred[list[str]]:
        # Nodes SUBSCRIBE to a channel exactly while they have subscribers for it.
        pattern = self._key("m", "".join("\\" + c if c in "*?[]\\" else c for c in prefix)) + "*"
        start = len(self._key("m", ""))

        def names(answer: list[bytes]) -> list[str]:
            return sorted({raw.decode()[start:] for raw in answer})

        return self._call("execute_command", "PUBSUB", "CHANNELS", pattern).addCallback(names)

    def unwatch(self, channel: str) -> None:
        count = self._watched.get(channel, 0) - 1
        if count > 0:
            self._watched[channel] = count
            return
        self._watched.pop(channel, None)
        self._last.pop(channel, None)
        self._last_envelope.pop(channel, None)
        self._resyncing.pop(channel, None)
        self._resync_running.pop(channel, None)
        self._resync_again.discard(channel)
        self._unsynced.discard(channel)
        self._release_readers(channel, None)
        if self._pubsub is not None and self._pubsub.connected:
            self._pubsub.unsubscribe_names([self._key("m", channel), self._key("p", channel)])

    def _subscriber_ready(self, protocol: _Subscriber) -> None:
        """
        Subscribe again to every watched channel; once Redis confirms, read
        back from history what was published while the connection was down.

        Only after the confirmation: a history read that Redis runs before
        the SUBSCRIBE would miss what is published in between, which the live
        stream does not carry either.  Nothing of these channels can arrive
        before the confirmation; what arrives after it waits for the resync.
        """
        self._pubsub = protocol
        self._note_health()
        channels = list(self._watched)
        if not channels:
            return
        names = [self._key(kind, c) for c in channels for kind in ("m", "p")]

        def confirmed(_: object) -> None:
            if self._pubsub is not protocol:
                return
            for channel in channels:
                if channel not in self._watched:
                    continue
                if channel in self._last:
                    self._resync(channel)
                else:
                    # Its first read may have run before this SUBSCRIBE: read again once it answers.
                    self._unsynced.add(channel)

        protocol.subscribe_names(names).addCallbacks(confirmed, lambda f: None)

    def _subscriber_lost(self, protocol: _Subscriber) -> None:
        if self._pubsub is protocol:
            self._pubsub = None
        self._note_health()

    def _on_pubsub(self, name: bytes, message: bytes) -> None:
        listener = self._listener
        if listener is None:
            return
        kind, _, channel = name.decode()[len(self.prefix) :].partition(":")
        if channel not in self._watched:
            return
        if kind == "p":
            event = json.loads(message)
            member = Member(str(event["member"]["id"]), event["member"].get("info"))
            listener.presence_changed(PresenceEvent(event["channel"], event["kind"], member, event.get("origin")))
            return
        meta = NO_META
        if message[:1] == b"!":
            header, _, message = message.partition(b" ")
            meta = read_meta_header(header)
        self._arrived(Publication.from_envelope(message, meta))

    def _arrived(self, publication: Publication, replayed: bool = False) -> None:
        """
        A live publication, or one that waited for a resync (C{replayed}):
        dispatch it if it follows the last one dispatched (the next offset,
        or offset 1 of a new epoch), else read the gap back from history
        first.

        A live one at an offset already dispatched is most often a
        duplicate, but it may be a new publication after Redis lost writes
        (a failover, a restart from an older file): when it is not the very
        envelope dispatched last, the resync reads the channel again and
        decides (L{_went_back}).  Offset 0 is the mark of an epoch moved by
        a node that found lost writes (L{MOVE_EPOCH_SCRIPT}), never a message.
        """
        channel = publication.channel
        waiting = self._resyncing.get(channel)
        if waiting is not None:
            waiting.append(publication)
            return
        if publication.offset == 0:
            self._epoch_moved(publication)
            return
        last = self._last.get(channel)
        if last is not None and not self._follows(last, publication):
            self._resyncing[channel] = [publication]
            self._resync(channel)
            return
        if (
            not replayed
            and last is not None
            and publication.epoch == last[1]
            and publication.offset <= last[0]
            and self._suspicious(channel, publication, last[0])
        ):
            self._resyncing[channel] = [publication]
            self._resync(channel)
            return
        self._dispatch(publication)

    def _suspicious(self, channel: str, publication: Publication, last_offset: int) -> bool:
        """Whether an already dispatched offset may carry a new publication (see L{_arrived})."""
        envelope = self._last_envelope.get(channel)
        if envelope is None:
            return False  # the position came from a read: its live copies arrive after it
        return publication.offset < last_offset or publication.envelope != envelope

    def _epoch_moved(self, mark: Publication) -> None:
        """Another node moved the channel to a new epoch (lost writes): its subscribers here must recover too."""
        last = self._last.get(mark.channel)
        if last is not None and last[1] != mark.epoch:
            log.warn(
                "Channel {channel}: Redis lost writes (seen by another node); subscribers must recover",
                channel=mark.channel,
            )
            self._lose(mark.channel)

    def _lose(self, channel: str) -> None:
        """Continuity is lost: forget the position, fail the waiting reads, tell the subscribers."""
        self._last.pop(channel, None)
        self._last_envelope.pop(channel, None)
        self._release_readers(channel, None)
        if self._listener is not None:
            self._listener.lost_continuity(channel)

    def _went_back(self, since: tuple[int, str], envelope: bytes | None, history: History) -> bool:
        """
        Whether Redis lost writes that this node dispatched: the channel is
        in the same epoch but its offset is below C{since}, or its history
        holds another publication than C{envelope} at that offset.  (With
        that entry trimmed, or no history kept, only the first is seen.)
        """
        if history.state.epoch != since[1]:
            return False
        if history.state.offset < since[0]:
            return True
        if envelope is not None:
            for publication in history.publications:
                if publication.offset == since[0]:
                    return publication.envelope != envelope
        return False

    def _move_epoch(self, channel: str, epoch: str) -> Deferred[Any]:
        """Move C{channel} from C{epoch} to a new one, unless another node did (L{MOVE_EPOCH_SCRIPT})."""
        new = new_epoch()
        keys = [self._key("meta", channel), self._key("hist", channel)]
        args = [
            epoch,
            new,
            int(self.history_ttl * 1000),
            self._key("m", channel),
            message_envelope(channel, EPOCH_MARK_EVENT, 0, new, b"null"),
        ]
        return self._call("eval", MOVE_EPOCH_SCRIPT, keys, args)

    @staticmethod
    def _follows(last: tuple[int, str], publication: Publication) -> bool:
        """Whether nothing can be missing between C{last} and C{publication} (duplicates are dropped later)."""
        if publication.epoch == last[1]:
            return publication.offset <= last[0] + 1
        return publication.offset == 1

    def _dispatch(self, publication: Publication) -> None:
        channel = publication.channel
        last = self._last.get(channel)
        if last is not None and last[1] == publication.epoch and publication.offset <= last[0]:
            return
        self._last[channel] = (publication.offset, publication.epoch)
        self._last_envelope[channel] = publication.envelope
        if self._listener is not None:
            self._listener.dispatch(publication)
        if channel in self._catching_up:
            self._release_readers(channel, publication)

    def _resync(self, channel: str) -> None:
        """
        Dispatch the publications after the last one dispatched, from
        history, then what waited (each checked for continuity again).
        """
        if channel in self._resync_running:
            # Under way, but its read may have run before the latest SUBSCRIBE: read once more after it.
            self._resync_again.add(channel)
            return
        self._resyncing.setdefault(channel, [])
        token = self._resync_running[channel] = object()
        since = self._last[channel]
        since_envelope = self._last_envelope.get(channel)

        def current() -> bool:
            return self._resync_running.get(channel) is token and self._listener is not None

        def replay(history: History) -> None:
            if not current():
                return
            if self._went_back(since, since_envelope, history):
                log.warn(
                    "Channel {channel}: Redis lost writes this node had dispatched (a failover, or a restart"
                    " from an older file): moving it to a new epoch; subscribers must recover",
                    channel=channel,
                )
                self._move_epoch(channel, since[1]).addCallbacks(lambda _: finish(None), failed)
                return
            finish(history)

        def finish(history: History | None) -> None:
            if not current():
                return
            del self._resync_running[channel]
            after = None if history is None else self._after(history, since[0], None)
            if after is not None and after.state.epoch == since[1] and after.complete:
                for publication in after.publications:
                    self._dispatch(publication)
            else:
                log.warn(
                    "Channel {channel}: messages were lost between nodes; subscribers must recover", channel=channel
                )
                self._lose(channel)
            if channel in self._resync_again:
                self._resync_again.discard(channel)
                if channel in self._last:
                    self._resync(channel)
                    return
            waiting = self._resyncing.pop(channel, [])
            if history is None:
                # The epoch was moved: what waited of the old one is forgotten with it.
                waiting = [p for p in waiting if p.epoch != since[1]]
            for publication in waiting:
                self._arrived(publication, replayed=True)

        def failed(failure: Any) -> None:
            # Redis is not answering yet (the command connection may come back
            # after the pub/sub one): try again shortly, keeping what waits.
            if not current():
                return
            del self._resync_running[channel]
            self._resync_again.discard(channel)
            self.reactor.callLater(RESYNC_RETRY, retry)

        def retry() -> None:
            if channel in self._watched and channel in self._last and self._listener is not None:
                self._resync(channel)
            else:
                self._resyncing.pop(channel, None)

        self._read(channel, with_history=True, wait=False).addCallbacks(replay, failed)

    # -- presence --------------------------------------------------------

    def _presence_event(self, channel: str, kind: str, member: Member, origin: str) -> bytes:
        return dumps({"kind": kind, "channel": channel, "member": member.to_json(), "origin": origin})

    def presence_add(self, channel: str, member: Member, origin: str) -> Deferred[None]:
        args = [
            f"{self.node}/{origin}",
            dumps(member.to_json()),
            member.id,
            self._key("p", channel),
            self._presence_event(channel, "join", member, origin),
            HEARTBEAT_TTL,
            self.prefix,
            channel,
            self.node,
        ]
        keys = [self._key("pres", channel), self.prefix + "node:" + self.node]
        return self._call("eval", PRESENCE_ADD_SCRIPT, keys, args)

    def presence_remove(self, channel: str, member: Member, origin: str) -> Deferred[None]:
        args = [
            f"{self.node}/{origin}",
            member.id,
            self._key("p", channel),
            self._presence_event(channel, "leave", member, origin),
            self.prefix,
            channel,
        ]
        d = self._call("eval", PRESENCE_REMOVE_SCRIPT, [self._key("pres", channel)], args)
        return d.addCallback(lambda _: self._held_one())

    def presence(self, channel: str) -> Deferred[list[Member]]:
        args = [self.prefix, channel]

        def members(values: list[bytes]) -> list[Member]:
            parsed = [json.loads(v) for v in values]
            return [Member(str(m["id"]), m.get("info")) for m in parsed]

        return self._call("eval", PRESENCE_LIST_SCRIPT, [self._key("pres", channel)], args).addCallback(members)
