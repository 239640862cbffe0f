"""
The twistd dropins: C{twistd pushie} (a name and where the service lives) and
the C{reuseport:} endpoint string (pushie/reuseport.py), for one Pushie per
core sharing a port.
"""

from twisted.application.service import ServiceMaker
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import directlyProvides

from pushie.reuseport import ReusePortParser

pushie = ServiceMaker(
    "Pushie",
    "pushie.tap",
    "A real-time push server: publish over HTTP, push over WebSocket.",
    "pushie",
)

reuseport = ReusePortParser()
directlyProvides(reuseport, IPlugin, IStreamServerEndpointStringParser)
