"""``WS /realtime``: change fan-out over WebSocket (issue 3). STUB: being built."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.web.resource import IResource, NoResource

from vibed.config import Config
from vibed.couch import CouchServer
from vibed.tokens import TokenIssuer


class RealtimeService(Service):
    def __init__(
        self, config: Config, couch: CouchServer, issuer: TokenIssuer, reactor: Any
    ) -> None:
        self.config = config
        self.couch = couch
        self.issuer = issuer
        self.reactor = reactor

    def resource(self) -> IResource:
        return NoResource()


def make_realtime(
    config: Config, couch: CouchServer, issuer: TokenIssuer, reactor: Any
) -> RealtimeService:
    return RealtimeService(config, couch, issuer, reactor)
