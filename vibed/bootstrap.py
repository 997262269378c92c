"""Bootstrap: the system databases and the ``byEmail`` index, idempotent, retried until CouchDB
answers; and the periodic purge of expired auth records. Both are Services that survive their
own errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from vibed.couch import CouchError, CouchServer, CouchUnauthorized
from vibed.naming import IDENTITIES_DB, REFRESH_DB, SYSTEM_DBS
from vibed.sessions import REFRESH_DDOC, REFRESH_INDEXES

_log = Logger(namespace="vibed.bootstrap")

BY_EMAIL_INDEX = {"fields": ["email"], "name": "byEmail", "ddoc": "identities"}


async def bootstrap(server: CouchServer) -> None:
    """Create what vibed needs in CouchDB; safe to run any number of times, on any replica."""
    for name in SYSTEM_DBS:
        await server.create_db(name)
    await server.database(IDENTITIES_DB).create_index(
        list(BY_EMAIL_INDEX["fields"]), name="byEmail", ddoc="identities"
    )
    # An identity's sessions (refresh families) and their tokens: its session list, and
    # what deleting it removes.
    for name, fields in REFRESH_INDEXES.items():
        await server.database(REFRESH_DB).create_index(fields, name=name, ddoc=REFRESH_DDOC)


class BootstrapService(Service):
    """Runs :func:`bootstrap` at start, retrying with backoff; ``ready`` once it succeeded."""

    def __init__(
        self,
        server: CouchServer,
        reactor: Any,
        wait_for: Callable[[], Deferred[Any]] | None = None,
    ) -> None:
        self.server = server
        self.reactor = reactor
        self.wait_for = wait_for
        self.ready = False
        self.last_error: str | None = "not started"
        self._running: Deferred[None] | None = None
        self._waiters: list[Deferred[None]] = []

    def whenReady(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.ready:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    def startService(self) -> None:
        super().startService()
        self._running = ensureDeferred(self._run())
        self._running.addErrback(lambda f: _log.failure("Bootstrap stopped", f))

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._running is not None:
            self._running.cancel()
        return None

    async def _run(self) -> None:
        if self.wait_for is not None:
            self.last_error = "waiting for the embedded CouchDB server"
            await self.wait_for()
        delay = 0.5
        while self.running:
            try:
                await bootstrap(self.server)
            except CouchUnauthorized:
                self.last_error = "CouchDB refused the credentials in --couchdb"
                _log.error("Bootstrap: {reason}", reason=self.last_error)
            except CouchError as e:
                self.last_error = f"CouchDB not reachable ({type(e).__name__})"
                _log.warn(
                    "Bootstrap: {reason}; retrying in {delay}s", reason=self.last_error, delay=delay
                )
            else:
                self.ready = True
                self.last_error = None
                _log.info("CouchDB bootstrapped at {url}", url=self.server.url)
                waiters, self._waiters = self._waiters, []
                for d in waiters:
                    d.callback(None)
                return
            await deferLater(self.reactor, delay, lambda: None)
            delay = min(delay * 2, 10.0)


class PurgeService(Service):
    """Every ``interval`` seconds, runs each purge job; a failing job is logged, never fatal."""

    def __init__(
        self, jobs: list[Callable[[], Awaitable[int]]], interval: float, reactor: Any
    ) -> None:
        self.jobs = jobs
        self._loop = LoopingCall(self.tick)
        self._loop.clock = reactor
        self.interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return None

    def tick(self) -> Deferred[int]:
        """One round of every job; fires with how many records they removed in all."""
        return ensureDeferred(self._run_jobs())

    async def _run_jobs(self) -> int:
        total = 0
        for job in self.jobs:
            try:
                removed = await job()
                if removed:
                    _log.info("Purged {n} expired records", n=removed)
                total += removed
            except Exception:
                # So a single error won't kill the loop.
                _log.failure("Purge job failed; will retry next round")
        return total
