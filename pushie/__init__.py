"""
Pushie: a real-time push server for web apps.

A web app POSTs JSON to C{/publish}; every browser subscribed to the channel
over a WebSocket receives it at once.  The public contract lives in README.md;
the modules are:

  - L{pushie.tap}: twistd options and C{makeService}, the only wiring place.
  - L{pushie.config}: settings (defaults < TOML < environment < command line).
  - L{pushie.hub}: the L{Hub} service that owns channels and subscribers.
  - L{pushie.engines}: where offsets, epochs and cross-node fan-out come from.
  - L{pushie.doors.websocket}, L{pushie.doors.sse}, L{pushie.doors.api}: the front doors.
  - L{pushie.client}: a standard-library publisher and listener for apps and scripts;
    L{pushie.cli}: the C{pushie} command built on it.
"""

__version__ = "0.1.0"
