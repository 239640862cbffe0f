# twistd -ny pushie.tac
#
# The same daemon as `twistd pushie`, configured only from PUSHIE_*
# environment variables (and the TOML file named by PUSHIE_CONFIG).
import os

from twisted.application.service import Application
from twisted.internet import reactor

from pushie.config import load_settings
from pushie.tap import PushieService

application = Application("pushie")
PushieService(
    load_settings(environ=os.environ), reactor, exit_on_failure=True, reload_on_sighup=True
).setServiceParent(application)
