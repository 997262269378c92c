"""``twistd vibed``: the Options and makeService twistd's plugin points at."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from vibed.config import Config, ConfigError, Options

__all__ = ["Options", "makeService"]


def makeService(options: Any) -> IService:
    """Validate the options (one clear line on error, no traceback) and build the tree."""
    from twisted.internet import reactor

    from vibed import poll
    from vibed.service import makeService as make
    from vibed.service import settle_memory

    try:
        config = Config.from_options(dict(options))
        service = make(config)
    except ConfigError as e:
        raise SystemExit(f"vibed: {e}") from None
    settle_memory(reactor)
    poll.install(reactor)
    return service
