"""The twistd dropin for C{twistd pushie}: a name and where the service lives."""

from twisted.application.service import ServiceMaker

pushie = ServiceMaker(
    "Pushie",
    "pushie.tap",
    "A real-time push server: publish over HTTP, push over WebSocket.",
    "pushie",
)
