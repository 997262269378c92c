"""twistd plugin ``vibed``: lazy, so twistd's plugin scan imports no reactor and no vibed code."""

from twisted.application.service import ServiceMaker

vibed = ServiceMaker(
    "vibed",
    "vibed.tap",
    "Vibe Cloud: identities, per-identity CouchDB data, blobs and realtime in one daemon.",
    "vibed",
)
