"""
The Pusher door: Pusher Channels protocol 7 (and 5 and 6) on the same Hub as Pushie's own
doors, so that pusher-js, Laravel Echo and the Pusher server SDKs work
unchanged.

  - L{pushie.doors.pusher.apps}: apps (id, key, secret, options), the apps
    file, their channel spaces, and every signature Pusher defines (channel
    auth, sign-in, HTTP API).
  - L{pushie.doors.pusher.door}: the WebSocket door at C{/app/<key>}.
  - L{pushie.doors.pusher.http}: the HTTP API under C{/apps/<app_id>/}.

The first configured app shares its channels with the native doors: a
C{POST /publish} reaches pusher-js subscribers of the same channel, and a
Pusher trigger reaches native WebSocket and SSE subscribers.  Other apps get
channel spaces of their own (L{pushie.doors.pusher.apps.App.hub_name}).
"""
