"""What a person manages about their own identity (the dashboard's server side): the list of
their collections with counts, their signed-in sessions, and one-time export links.

Collections are key ranges of ``db_<idn>_data`` (:mod:`vibed.layout`), so listing them needs
no index: a walk over ``_all_docs`` asks for the first id at or after a position (the first
document of the next collection) and jumps past that collection's range. Counting uses the
``offset`` CouchDB reports for ``_all_docs`` (the number of rows before the start key): a
collection's count is the offset after its range minus the offset at its first document, so
one request per collection whatever its size. PouchDB Server reports no real offset (it
answers the ``skip``); that is detected (the offset at the end of the key space must equal
``total_rows``) and the rows are counted instead, a key-only page at a time.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from typing import Any

from attrs import define, field, frozen

from vibed.couch import CouchConflict, CouchDatabase, CouchNotFound, CouchServer
from vibed.errors import NotFound
from vibed.layout import RANGE_END, split_storage_id
from vibed.naming import NONCES_DB, identity_db
from vibed.sessions import RefreshStore, purge_expired

#: At most this many collections are listed (a person's own, made by their apps).
MAX_COLLECTIONS = 1000
_COUNT_PAGE = 5000
EXPORT_TICKET_TTL = 120
_TICKET_PREFIX = "export:"


@frozen
class CollectionInfo:
    name: str
    count: int


async def list_collections(db: CouchDatabase) -> list[CollectionInfo]:
    """The collections of a data database, in name order, with their document counts."""
    # Every app document id starts with its collection, [a-z]...; blob records ("$blob:")
    # and design documents ("_design/") sort before "a" and are never visited.
    end = await db.all_docs(startkey="z" + RANGE_END, limit=0)
    offsets_real = end.get("offset") == end.get("total_rows")
    found: list[CollectionInfo] = []
    start = "a"
    while len(found) < MAX_COLLECTIONS:
        page = await db.all_docs(startkey=start, endkey="z" + RANGE_END, limit=1)
        rows = page.get("rows", [])
        if not rows:
            break
        first = str(rows[0]["id"])
        split = split_storage_id(first)
        if split is None:
            start = first + "\u0000"  # not an app document: step over it
            continue
        name = split[0]
        after = f"{name}:{RANGE_END}"
        if offsets_real:
            past = await db.all_docs(startkey=after, limit=0)
            count = int(past["offset"]) - int(page["offset"])
        else:
            count = await _count_range(db, first, after)
        found.append(CollectionInfo(name, count))
        start = after
    # Key order puts "notes-x:" before "notes:" ("-" sorts before ":"); people read names.
    return sorted(found, key=lambda c: c.name)


async def _count_range(db: CouchDatabase, first: str, end: str) -> int:
    count = 0
    startkey = first
    skip = 0
    while True:
        page = await db.all_docs(startkey=startkey, endkey=end, limit=_COUNT_PAGE, skip=skip)
        rows = page.get("rows", [])
        count += len(rows)
        if len(rows) < _COUNT_PAGE:
            return count
        startkey, skip = rows[-1]["id"], 1


@frozen
class ExportTicket:
    idn: str
    sid: str | None


@define
class AccountService:
    couch: CouchServer
    refresh: RefreshStore
    clock: Callable[[], float] = field(default=time.time, repr=False)

    # -- collections -------------------------------------------------------------------------

    async def collections(self, idn: str) -> list[CollectionInfo]:
        try:
            return await list_collections(self.couch.database(identity_db(idn, "data")))
        except CouchNotFound:
            raise NotFound("This identity no longer exists.", slug="no-identity") from None

    # -- sessions ----------------------------------------------------------------------------

    async def sessions(self, idn: str) -> list[dict[str, Any]]:
        """The identity's live first-party sessions (its browsers and devices), newest use
        first. Apps' sessions are not listed here: they belong to their grants."""
        out = []
        for fam in await self.refresh.families(idn, live_only=True):
            if fam.get("revoked") or fam.get("grant"):
                continue
            out.append(
                {
                    "id": fam["_id"][len("fam:") :],
                    "createdAt": _iso(fam.get("createdAt")),
                    "lastUsedAt": _iso(fam.get("lastUsedAt") or fam.get("createdAt")),
                    "userAgent": fam.get("userAgent"),
                }
            )
        return sorted(out, key=lambda s: (s["lastUsedAt"] or "", s["id"]), reverse=True)

    async def revoke_session(self, idn: str, sid: str) -> bool:
        """End one of the identity's sessions; False when it has no such live session."""
        fam = await self.refresh.family(sid)
        if fam is None or fam.get("idn") != idn or fam.get("grant") or fam.get("revoked"):
            return False
        await self.refresh.revoke_family(sid)
        return True

    async def revoke_other_sessions(self, idn: str, keep: str | None) -> int:
        """End every first-party session of ``idn`` but ``keep``; returns how many."""
        ended = 0
        for session in await self.sessions(idn):
            if session["id"] != keep:
                await self.refresh.revoke_family(session["id"])
                ended += 1
        return ended

    # -- export links ------------------------------------------------------------------------

    @property
    def _tickets(self) -> CouchDatabase:
        return self.couch.database(NONCES_DB)

    async def export_ticket(self, idn: str, sid: str | None) -> tuple[str, int]:
        """A one-time secret that downloads ``idn``'s export once, within a short time (a
        browser download cannot carry an Authorization header). Stored hashed."""
        ticket = secrets.token_urlsafe(32)
        expires = int(self.clock()) + EXPORT_TICKET_TTL
        await self._tickets.put(
            {"_id": _ticket_id(ticket), "idn": idn, "sid": sid, "expiresAt": expires}
        )
        return ticket, expires

    async def redeem(self, ticket: str) -> ExportTicket | None:
        """Spend ``ticket`` (once, on any replica); None when unknown, used or expired."""
        if not isinstance(ticket, str) or len(ticket) != 43:
            return None
        try:
            doc = await self._tickets.get(_ticket_id(ticket))
            await self._tickets.delete(doc["_id"], doc["_rev"])
        except (CouchNotFound, CouchConflict):
            return None
        if self.clock() > doc.get("expiresAt", 0):
            return None
        return ExportTicket(idn=doc["idn"], sid=doc.get("sid"))

    async def purge(self) -> int:
        """Delete export tickets that expired unused."""
        return await purge_expired(self._tickets, _TICKET_PREFIX, self.clock())


def _ticket_id(ticket: str) -> str:
    return _TICKET_PREFIX + hashlib.sha256(ticket.encode("ascii")).hexdigest()


def _iso(value: object) -> str | None:
    from datetime import UTC, datetime

    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
