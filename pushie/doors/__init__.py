# -*- test-case-name: tests.test_api -*-
"""
The front doors: how clients reach the Hub.

  - L{pushie.doors.websocket}: the native WebSocket door at C{/websocket}.
  - L{pushie.doors.sse}: Server-Sent Events at C{/events}.
  - L{pushie.doors.api}: C{POST /publish} and the server API (C{/channels/...}, C{/health}).
  - L{pushie.doors.pusher}: the Pusher protocol (WebSocket at C{/app/<key>}, HTTP under C{/apps/<id>/}).
  - L{pushie.doors.tree}: the resource tree that puts them at their paths.

A door talks to the Hub only (never to an engine), and to auth, limits and
the records it moves.  The modules whose names start with C{_} lean on
private Twisted or Autobahn internals and say which at their top.
"""
