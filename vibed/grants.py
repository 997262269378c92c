"""Grants: what a person allowed an app (one origin) to do, one document per grant in the
identity's ``db_<idn>_permissions``.

::

    {"_id": "grant:<gid>", "type": "grant", "origin": "https://notes.example",
     "scopes": ["data:read:notes", "data:write:notes"], "name": "Notes" | null,
     "via": "consent" | "agent", "createdAt": "<ISO 8601>", "lastUsedAt": "<ISO 8601>" | null}

``gid`` is 32 hex characters. A grant is created when the person approves an app on the
consent page (or, later, through the agent: :meth:`GrantStore.create` is the one way to make
one). App sessions (refresh-token families) and access tokens carry the grant id; deleting
the grant ends them: refresh tokens at once (every refresh reads the grant), access tokens on
every replica within seconds (the revocation list), realtime sockets with close code 4004.
Re-approving the app later makes a new grant.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from attrs import define, field, frozen
from twisted.logger import Logger

from vibed.couch import CouchConflict, CouchDatabase, CouchError, CouchNotFound, CouchServer
from vibed.naming import identity_db
from vibed.oauth import covers

_log = Logger(namespace="vibed.grants")

GID_RE = re.compile(r"^[0-9a-f]{32}\Z")
PREFIX = "grant:"
#: lastUsedAt is written at most this often per grant (it is written on token issuance).
TOUCH_EVERY = 60


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _epoch(iso: str | None) -> float:
    if not iso:
        return 0.0
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@frozen
class Grant:
    id: str
    idn: str
    origin: str
    scopes: tuple[str, ...]
    name: str | None
    via: str
    created_at: str
    last_used_at: str | None

    @classmethod
    def from_doc(cls, idn: str, doc: dict[str, Any]) -> Grant:
        return cls(
            id=doc["_id"][len(PREFIX) :],
            idn=idn,
            origin=doc["origin"],
            scopes=tuple(doc["scopes"]),
            name=doc.get("name"),
            via=doc.get("via", "consent"),
            created_at=doc["createdAt"],
            last_used_at=doc.get("lastUsedAt"),
        )

    def public(self) -> dict[str, Any]:
        """What ``GET /me/grants`` shows."""
        return {
            "id": self.id,
            "origin": self.origin,
            "scopes": list(self.scopes),
            "name": self.name,
            "via": self.via,
            "createdAt": self.created_at,
            "lastUsedAt": self.last_used_at,
        }


@define
class GrantStore:
    server: CouchServer
    clock: Callable[[], float] = field(default=time.time, repr=False)
    #: the process's RevocationList (``revoke_grant``); None in unit tests
    revocations: Any = field(default=None, repr=False)

    def _db(self, idn: str) -> CouchDatabase:
        return self.server.database(identity_db(idn, "permissions"))

    async def create(
        self,
        idn: str,
        origin: str,
        scopes: tuple[str, ...],
        name: str | None = None,
        via: str = "consent",
    ) -> Grant:
        """Record that the person allowed ``origin`` ``scopes`` (validated by the caller)."""
        gid = secrets.token_hex(16)
        now = _iso(self.clock())
        doc = {
            "_id": PREFIX + gid,
            "type": "grant",
            "origin": origin,
            "scopes": list(scopes),
            "name": name,
            "via": via,
            "createdAt": now,
            "lastUsedAt": now,
        }
        await self._db(idn).put(doc)
        _log.info("Grant {gid} to {origin} by {idn}", gid=gid, origin=origin, idn=idn)
        return Grant.from_doc(idn, doc)

    def _revoked(self, gid: str) -> bool:
        # Revoked but perhaps not deleted yet (revoke() writes the revocation first).
        return self.revocations is not None and self.revocations.grant_revoked(gid)

    async def get(self, idn: str, gid: str) -> Grant | None:
        if not isinstance(gid, str) or GID_RE.match(gid) is None or self._revoked(gid):
            return None
        try:
            doc = await self._db(idn).get(PREFIX + gid)
        except CouchNotFound:
            return None
        return Grant.from_doc(idn, doc)

    async def list_grants(self, idn: str) -> list[Grant]:
        """The identity's grants, newest first."""
        page = await self._db(idn).all_docs(
            startkey=PREFIX, endkey=PREFIX + "\ufff0", include_docs=True, limit=10_000
        )
        grants = [
            Grant.from_doc(idn, row["doc"])
            for row in page.get("rows", [])
            if isinstance(row.get("doc"), dict)
        ]
        grants = [g for g in grants if not self._revoked(g.id)]
        return sorted(grants, key=lambda g: (g.created_at, g.id), reverse=True)

    async def find_covering(self, idn: str, origin: str, scopes: tuple[str, ...]) -> Grant | None:
        """The newest grant of ``origin`` that allows every one of ``scopes``, if any."""
        for grant in await self.list_grants(idn):
            if grant.origin == origin and covers(grant.scopes, scopes):
                return grant
        return None

    async def revoke(self, idn: str, gid: str) -> bool:
        """Delete the grant; its access tokens stop on every replica. False if unknown."""
        if not isinstance(gid, str) or GID_RE.match(gid) is None:
            return False
        try:
            # Read it even if its revocation is known: a revoke that failed half-way (the
            # revocation written, the document not deleted) is finished by the next one.
            grant = Grant.from_doc(idn, await self._db(idn).get(PREFIX + gid))
        except CouchNotFound:
            return False
        if self.revocations is not None:
            await self.revocations.revoke_grant(gid)
        db = self._db(idn)
        for _attempt in range(5):
            try:
                doc = await db.get(PREFIX + gid)
                await db.delete(doc["_id"], doc["_rev"])
                break
            except CouchNotFound:
                break
            except CouchConflict:
                continue
        _log.info("Grant {gid} to {origin} revoked by {idn}", gid=gid, origin=grant.origin, idn=idn)
        return True

    async def touch(self, grant: Grant) -> None:
        """Note that the grant was used (a token was issued under it); best effort, and at
        most every TOUCH_EVERY seconds (judged from the grant as read, so usually no write)."""
        now = self.clock()
        if now - _epoch(grant.last_used_at) < TOUCH_EVERY:
            return
        db = self._db(grant.idn)
        try:
            doc = await db.get(PREFIX + grant.id)
            doc["lastUsedAt"] = _iso(now)
            await db.put(doc)
        except CouchError as e:
            _log.info("Grant {gid}: lastUsedAt not written ({error})", gid=grant.id, error=type(e))
