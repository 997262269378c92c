# `twistd -ny vibed.tac`: the same service tree as `twistd vibed`, configured from VIBE_* env.
from twisted.application.service import Application

from vibed.tap import makeService

application = Application("vibed")
makeService({}).setServiceParent(application)
