"""The service tree, built in one place: ``makeService(config) -> MultiService``.

Children start in this order and stop in reverse: the crypto thread pool, the embedded
CouchDB server (when ``--couchdb embedded``), bootstrap, the purge timer, and the HTTP
listener. With the embedded server, the listener waits until the child answers, so the first
request never meets a database that is not there yet.
"""

from __future__ import annotations

import time
from typing import Any

from attrs import define
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from agent_bridge.api import AgentBridge
from vibed.api.apps import AppsAPI, make_apps, web_dir
from vibed.api.auth import AuthAPI
from vibed.api.data import make_data_api
from vibed.api.direct import DirectRoutes, LeanDirectRoutes
from vibed.api.me import make_me
from vibed.api.root import VibeAPI
from vibed.api.site import make_site
from vibed.blobs import make_blobs
from vibed.bootstrap import BootstrapService, PurgeService
from vibed.config import Config, ConfigError
from vibed.cors import CORSResource
from vibed.couch import CouchServer
from vibed.cpu import CPUPool, CryptoPool
from vibed.identity import IdentityService
from vibed.naming import NONCES_DB, RATELIMIT_DB, REFRESH_DB, REVOCATIONS_DB
from vibed.ratelimit import RateLimiter
from vibed.realtime import make_realtime
from vibed.revocation import RevocationList
from vibed.sessions import NonceStore, RefreshStore
from vibed.tokens import LEEWAY, TokenIssuer, load_or_create_signing_key
from vibed.web import AddressLimit, BodyPolicy, VibeSite

_log = Logger(namespace="vibed.service")


class ListenWhenReady(Service):
    """Listens on ``endpoint`` once ``ready()`` fires; stops listening on stop."""

    def __init__(self, endpoint: Any, site: Any, ready: Any, reactor: Any) -> None:
        self.endpoint = endpoint
        self.site = site
        self.ready = ready
        self.reactor = reactor
        self.port: IListeningPort | None = None
        self._listening: Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        d: Deferred[Any] = self.ready()
        d.addCallback(lambda _: self.endpoint.listen(self.site))
        d.addCallback(self._listened)
        d.addErrback(self._failed)
        self._listening = d

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        _log.info("vibed listening on {address}", address=port.getHost())
        return port

    def _failed(self, failure: Any) -> None:
        _log.critical("vibed cannot serve: {error}", error=failure.getErrorMessage())
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        if self._listening is not None:
            self._listening.cancel()
        return None


@define
class Components:
    """What makeService wired together; tests reach into it."""

    config: Config
    couch: CouchServer
    pool: CPUPool
    issuer: TokenIssuer
    identities: IdentityService
    refresh: RefreshStore
    nonces: NonceStore
    limiter: RateLimiter
    revocations: RevocationList
    bootstrap: BootstrapService
    api: VibeAPI
    apps: AppsAPI
    services: list[IService]  # started by makeService (or a test harness), stopped in reverse
    body_policies: dict[bytes, BodyPolicy]

    def site(self) -> AddressLimit:
        """The factory to listen with: the site, behind the per-address connection cap."""
        routes = DirectRoutes(self.api.data, self.api.resource())
        site = VibeSite(
            CORSResource(routes),
            self.body_policies,
            self.config.access_log,
            self.config.connection_limits,
        )
        site.lean_routes = LeanDirectRoutes(routes, cors=True)
        return AddressLimit(site)


def build(
    config: Config,
    reactor: Any,
    couch: CouchServer,
    pool: CPUPool,
    bootstrap: BootstrapService,
    clock: Any = time.time,
) -> Components:
    """Wire the collaborators (no listening, no child processes)."""
    try:
        key = load_or_create_signing_key(config.jwt_key_file)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--jwt-key-file: {e}") from None
    mode = config.jwt_key_file.stat().st_mode
    if mode & 0o077:
        _log.warn(
            "The JWT signing key {path} is readable by other users (mode {mode:o}); chmod 600 it",
            path=str(config.jwt_key_file),
            mode=mode & 0o777,
        )
    issuer = TokenIssuer(
        key=key,
        issuer=config.public_url,
        audience=config.public_url,
        ttl=config.access_ttl,
        clock=clock,
    )
    revocations = RevocationList(
        couch.database(REVOCATIONS_DB),
        # Long enough that no token a revocation could stop is still accepted after it.
        ttl=config.access_ttl + 2 * LEEWAY,
        reactor=reactor,
        clock=clock,
        wait_for=bootstrap.whenReady,
    )
    issuer.revocations = revocations
    identities = IdentityService(server=couch, pool=pool, clock=clock)
    refresh = RefreshStore(
        db=couch.database(REFRESH_DB),
        secret=issuer.derived_secret(b"vibed refresh successor v1"),
        clock=clock,
        ttl=config.refresh_ttl,
        grace=config.refresh_grace,
        revocations=revocations,
    )
    nonces = NonceStore(db=couch.database(NONCES_DB), clock=clock, ttl=config.nonce_ttl)
    limiter = RateLimiter(db=couch.database(RATELIMIT_DB), clock=clock)
    auth = AuthAPI(
        config=config,
        identities=identities,
        issuer=issuer,
        refresh=refresh,
        limiter=limiter,
    )
    data = make_data_api(config, couch, issuer)
    realtime = make_realtime(config, couch, issuer, reactor)
    revocations.add_listener(realtime.revoked)
    blobs = make_blobs(config, couch, issuer, reactor, clock)
    apps = make_apps(config, couch, auth, identities, issuer, refresh, revocations, clock)
    me, deletions = make_me(
        config,
        couch,
        issuer,
        identities,
        refresh,
        limiter,
        revocations,
        apps,
        blobs,
        reactor,
        clock,
    )
    api = VibeAPI(
        auth=auth,
        data=data,
        blob=blobs.api,
        realtime=realtime.resource(),
        identities=identities,
        issuer=issuer,
        couch=couch,
        bootstrap=bootstrap,
        revocations=revocations,
        public_url=config.public_url,
        apps=apps,
        agent=AgentBridge(auth=auth, nonces=nonces, grants=apps.grants, authority=apps.authority),
        me_api=me,
        site=make_site(config, web_dir(), blobs.api.blobs.store),
        worker=config.extra.get("worker"),
    )
    return Components(
        config=config,
        couch=couch,
        pool=pool,
        issuer=issuer,
        identities=identities,
        refresh=refresh,
        nonces=nonces,
        limiter=limiter,
        revocations=revocations,
        bootstrap=bootstrap,
        api=api,
        apps=apps,
        # The revocation list first: tokens cannot be checked until it is loaded.
        services=[revocations, realtime, *blobs.services, deletions],
        body_policies=blobs.body_policies,
    )


def settle_memory(reactor: Any) -> None:
    """Once the reactor runs, move everything made so far (modules, classes, the service
    tree) out of the cyclic garbage collector's sight (``gc.freeze``): its full collections,
    which the many short-lived objects of each request trigger, then no longer walk the
    daemon's long-lived objects again and again. For the daemon's processes, not for tests
    that build many services in one process (what it freezes is never collected).

    The youngest generation is collected every 10,000 allocations instead of 700: a request
    makes a few hundred objects, most of them freed by reference counting, so the default
    walked the same in-flight requests' objects over and over (about 3 % of a proxied get's
    instructions, ``bench/cost.py``); the garbage cycles a request leaves (twisted.web's
    request and channel, Deferred callbacks) still go within a few hundred requests."""
    import gc

    reactor.callWhenRunning(gc.freeze)
    gc.set_threshold(10_000, 10, 10)


def makeService(config: Config, reactor: Any = None, endpoint: Any = None) -> MultiService:
    """The whole daemon as one service tree (with ``--workers`` above 1: the supervisor of
    the worker processes, see :mod:`vibed.workers`). ``endpoint`` replaces the one
    ``--port`` names (a worker adopts its supervisor's socket)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    top = MultiService()
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if config.workers > 1:
        return _supervisor(config, reactor, top)

    pool = CryptoPool(config.crypto_threads, reactor)
    pool.setServiceParent(top)

    wait_for = None
    if config.embedded:
        from vibed.embedded import EmbeddedCouch, EmbeddedCouchMissing, find_pouchdb_server

        try:
            executable = find_pouchdb_server(config.pouchdb_server)
        except EmbeddedCouchMissing as e:
            raise ConfigError(f"--couchdb embedded: {e}") from None
        embedded = EmbeddedCouch(
            config.data_dir / "couchdb", executable=executable, reactor=reactor
        )
        embedded.setServiceParent(top)
        couch = CouchServer.from_url(embedded.url, timeout=config.couch_timeout, reactor=reactor)
        wait_for = embedded.whenReady
    else:
        couch = CouchServer.from_url(config.couchdb, timeout=config.couch_timeout, reactor=reactor)

    bootstrap = BootstrapService(couch, reactor, wait_for=wait_for)
    bootstrap.setServiceParent(top)

    parts = build(config, reactor, couch, pool, bootstrap)

    purge = PurgeService(
        [
            # Keep events as long as the longest window that counts them.
            lambda: parts.limiter.purge(
                older_than=2 * max(config.login_window, config.signup_window, 60)
            ),
            parts.nonces.purge,
            parts.refresh.purge,
            parts.apps.authority.codes.purge,
            parts.revocations.purge,
            parts.api.me_api.account.purge,
        ],
        interval=600,
        reactor=reactor,
    )
    purge.setServiceParent(top)

    for child in parts.services:
        child.setServiceParent(top)

    if endpoint is None:
        endpoint = serverFromString(reactor, config.port)
    site = parts.site()
    ready = wait_for if wait_for is not None else (lambda: succeed(None))
    ListenWhenReady(endpoint, site, ready, reactor).setServiceParent(top)
    top.components = parts  # type: ignore[attr-defined]
    return top


def _supervisor(config: Config, reactor: Any, top: MultiService) -> MultiService:
    """``--workers N``: the embedded server (if any) and the workers' supervisor."""
    from vibed.workers import WorkerSupervisor

    try:
        load_or_create_signing_key(config.jwt_key_file)  # once, before the workers race
    except (OSError, ValueError) as e:
        raise ConfigError(f"--jwt-key-file: {e}") from None
    couch_url: Any = lambda: config.couchdb  # noqa: E731
    ready: Any = lambda: succeed(None)  # noqa: E731
    if config.embedded:
        from vibed.embedded import EmbeddedCouch, EmbeddedCouchMissing, find_pouchdb_server

        try:
            executable = find_pouchdb_server(config.pouchdb_server)
        except EmbeddedCouchMissing as e:
            raise ConfigError(f"--couchdb embedded: {e}") from None
        embedded = EmbeddedCouch(
            config.data_dir / "couchdb", executable=executable, reactor=reactor
        )
        embedded.setServiceParent(top)
        couch_url = lambda: embedded.url  # noqa: E731
        ready = embedded.whenReady
    raw = dict(config.raw)
    WorkerSupervisor(reactor, config.port, config.workers, raw, couch_url, ready).setServiceParent(
        top
    )
    return top
