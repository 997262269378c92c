"""Revoked sessions, grants and identities, known to every replica within seconds.

An access token is verified without a database read and lives ``access_ttl`` (15 minutes).
Logging out, a refresh token reused after rotation (its family is revoked), an app's grant
revoked by the person, or an identity deleted must stop the matching access tokens long before
they expire, on every replica. This module owns that.

A revocation is a small document in ``vibe_revocations``::

    {"_id": "r:sid:<session family>", "expiresAt": <unix time>}
    {"_id": "r:gid:<grant id>",       "expiresAt": <unix time>}
    {"_id": "r:sub:<identity id>",    "expiresAt": <unix time>, "before": <unix time>}

``sid`` and ``gid`` stop every token carrying that claim; ``sub`` stops the identity's tokens
issued at or before ``before`` (identity deleted, password changed). ``expiresAt`` is the
revocation time plus the access-token lifetime and the clock leeway: after it no token the
revocation could stop is still accepted, so the document is purged.

Every process keeps the live revocations in memory (a dict lookup per request) and follows
the database's continuous ``_changes`` feed, so a revocation written by any replica reaches all
of them as fast as CouchDB streams it (milliseconds; a dropped feed reconnects from its last
seq and misses nothing). A revocation made here applies here at once, before the write returns.

Until the list is first loaded, or when the feed has been down for ``max_stale`` seconds (a
replica cut off from CouchDB while clients still reach it), nobody can say whether a token
was revoked: :meth:`RevocationList.check` raises :class:`RevocationsUnavailable` and the API
answers 503 rather than guess.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from vibed.couch import CouchConflict, CouchDatabase, CouchError, CouchUnavailable
from vibed.couch.client import ChangesFeed
from vibed.sessions import purge_expired

_log = Logger(namespace="vibed.revocation")

KINDS = ("sid", "gid", "sub")
PREFIX = "r:"

#: ``listener(kind, value)`` runs once per revocation this process learns of.
Listener = Callable[[str, str], object]


class RevocationsUnavailable(Exception):
    """Whether a token was revoked cannot be known now (list not loaded, feed down too long)."""


class RevocationList(Service):
    """The live revocations of the deployment, kept current from CouchDB."""

    def __init__(
        self,
        db: CouchDatabase,
        *,
        ttl: int,
        reactor: Any,
        clock: Callable[[], float] = time.time,
        wait_for: Callable[[], Deferred[Any]] | None = None,
        max_stale: float = 30.0,
        heartbeat_ms: int = 5_000,
    ) -> None:
        self.db = db
        self.ttl = ttl
        self.reactor = reactor
        self.clock = clock
        self.wait_for = wait_for
        self.max_stale = max_stale
        self.heartbeat_ms = heartbeat_ms
        #: "<kind>:<value>" -> (expiresAt, before); ``before`` only for ``sub``
        self._revoked: dict[str, tuple[float, float | None]] = {}
        self._listeners: list[Listener] = []
        self._feed: ChangesFeed | None = None
        self._loaded = False
        self._down_since: float | None = None
        self._loading: Deferred[None] | None = None
        self._ready_waiters: list[Deferred[None]] = []

    # -- lifetime ----------------------------------------------------------------------------

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        self._loading = ensureDeferred(self._load())
        self._loading.addErrback(lambda f: _log.failure("revocation list: loading stopped", f))

    def stopService(self) -> Deferred[None]:  # noqa: N802
        super().stopService()
        if self._loading is not None and not self._loading.called:
            self._loading.cancel()
        feed, self._feed = self._feed, None
        return feed.stop() if feed is not None else succeed(None)

    @property
    def ready(self) -> bool:
        return self._loaded

    def when_ready(self) -> Deferred[None]:
        """Fires once the list has been loaded."""
        if self._loaded:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._ready_waiters.append(waiter)
        return waiter

    async def _load(self) -> None:
        if self.wait_for is not None:
            await self.wait_for()
        delay = 0.5
        while self.running:
            try:
                # The seq first, then the documents: the feed then starts no later than what
                # was read, so nothing written in between is missed (seen twice is harmless).
                info = await self.db.info()
                since = info.get("update_seq", "0")
                await self._read_all()
            except CouchError as exc:
                _log.warn(
                    "revocation list: CouchDB not reachable ({error}); again in {delay} s",
                    error=str(exc),
                    delay=delay,
                )
                await deferLater(self.reactor, delay, lambda: None)
                delay = min(delay * 2, 10.0)
                continue
            break
        if not self.running:
            return
        self._feed = self.db.changes_feed(
            self._on_row,
            since=str(since) if not isinstance(since, str) else since,
            include_docs=True,
            heartbeat_ms=self.heartbeat_ms,
            clock=self.reactor,
            on_connected=self._connected,
            on_error=self._failed,
        )
        self._feed.start()
        self._loaded = True
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _read_all(self) -> None:
        startkey: str | None = PREFIX
        while startkey is not None:
            page = await self.db.all_docs(
                startkey=startkey, endkey=PREFIX + "\ufff0", limit=500, include_docs=True
            )
            rows = page.get("rows", [])
            for row in rows:
                doc = row.get("doc")
                if isinstance(doc, dict):
                    self._learn(doc)
            startkey = rows[-1]["id"] + "\u0000" if len(rows) == 500 else None

    def _connected(self) -> None:
        self._down_since = None

    def _failed(self, _exc: CouchError) -> None:
        if self._down_since is None:
            self._down_since = self.clock()

    def _on_row(self, row: dict[str, Any]) -> None:
        doc = row.get("doc")
        if isinstance(doc, dict) and not row.get("deleted"):
            self._learn(doc)

    def _learn(self, doc: dict[str, Any]) -> None:
        doc_id = doc.get("_id")
        if not isinstance(doc_id, str) or not doc_id.startswith(PREFIX):
            return
        key = doc_id[len(PREFIX) :]
        kind, _, value = key.partition(":")
        expires = doc.get("expiresAt")
        before = doc.get("before")
        if kind not in KINDS or not value or not isinstance(expires, int | float):
            return
        if kind != "sub":
            self._apply(kind, value, float(expires), None)
        elif isinstance(before, int | float):
            self._apply(kind, value, float(expires), float(before))

    def _apply(self, kind: str, value: str, expires: float, before: float | None) -> None:
        key = f"{kind}:{value}"
        known = self._revoked.get(key)
        if known is not None and (before is None or (known[1] or 0) >= before):
            return
        self._revoked[key] = (expires, before)
        for listener in list(self._listeners):
            try:
                listener(kind, value)
            except Exception:
                _log.failure("revocation listener failed")

    # -- the API -----------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(kind, value)`` for each revocation learnt from now on."""
        self._listeners.append(listener)

    def is_revoked(self, sub: str, iat: int, sid: str | None, gid: str | None) -> bool:
        """Whether a token with these claims was revoked; RevocationsUnavailable if unknown."""
        if not self._loaded:
            raise RevocationsUnavailable("the revocation list is not loaded yet")
        now = self.clock()
        if self._down_since is not None and now - self._down_since > self.max_stale:
            raise RevocationsUnavailable("the revocation feed has been down too long")
        for key in (f"sid:{sid}" if sid else None, f"gid:{gid}" if gid else None):
            if key is not None:
                entry = self._revoked.get(key)
                if entry is not None:
                    if entry[0] >= now:
                        return True
                    del self._revoked[key]
        entry = self._revoked.get(f"sub:{sub}")
        if entry is not None:
            if entry[0] < now:
                del self._revoked[f"sub:{sub}"]
            elif entry[1] is not None and iat <= entry[1]:
                return True
        return False

    def grant_revoked(self, gid: str) -> bool:
        """Whether grant ``gid`` is known here to be revoked. A grant's document is deleted
        just after its revocation is written, so a replica may see the revocation (and close
        the grant's sockets) while the document still exists: who reads a grant asks this too.
        """
        entry = self._revoked.get(f"gid:{gid}")
        return entry is not None and entry[0] >= self.clock()

    def revoked_keys(self) -> set[str]:
        """The live revocations as "kind:value" (for tests and diagnostics)."""
        now = self.clock()
        return {k for k, (expires, _) in self._revoked.items() if expires >= now}

    async def revoke_session(self, sid: str) -> None:
        """Stop every access token of session (refresh family) ``sid``."""
        await self._revoke("sid", sid)

    async def revoke_grant(self, gid: str) -> None:
        """Stop every access token issued under grant ``gid``."""
        await self._revoke("gid", gid)

    async def revoke_identity(self, idn: str) -> None:
        """Stop every access token of identity ``idn`` issued until now."""
        await self._revoke("sub", idn, before=self.clock())

    async def _revoke(self, kind: str, value: str, before: float | None = None) -> None:
        if not value:
            raise ValueError("nothing to revoke")
        now = self.clock()
        expires = int(now) + self.ttl
        doc: dict[str, Any] = {"_id": f"{PREFIX}{kind}:{value}", "expiresAt": expires}
        if before is not None:
            doc["before"] = int(before)
        # Applied here first: this replica refuses the token even if the write fails below.
        self._apply(kind, value, float(expires), float(int(before)) if before else None)
        for _attempt in range(5):
            try:
                await self.db.put(doc)
                return
            except CouchConflict:
                try:
                    current = await self.db.get(doc["_id"])
                except CouchError:
                    continue
                doc["_rev"] = current["_rev"]
                doc["expiresAt"] = max(expires, int(current.get("expiresAt", 0)))
                if before is not None:
                    doc["before"] = max(int(before), int(current.get("before", 0)))
        raise CouchUnavailable(0, "contention", "the revocation could not be written")

    async def purge(self) -> int:
        """Delete revocations no token can outlive any more."""
        return await purge_expired(self.db, PREFIX, self.clock())
