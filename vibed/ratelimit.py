"""Sliding-window rate limits kept in CouchDB, so every replica sees the same counts.

Each counted event is one small insert-only document, ``rl:<key hash>:<ms timestamp>:<random>``
(no read-modify-write, so concurrent replicas never conflict). Counting a key is one
``_all_docs`` key-range read from ``now - window`` to the end of the key's range, stopped at
the limit. Keys are hashed: an email address never becomes a document id in clear.

Checking a count and then acting on it is a race (a burst of concurrent requests all see the
count before any of them is recorded), so a guarded action *reserves* its event first with
:meth:`RateLimiter.reserve` (count, record, count again including itself) and gives the
reservation back with :meth:`RateLimiter.release` when it should not count (a login that
succeeded): of any number of concurrent attempts, at most ``limit`` get through.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from attrs import define, field, frozen
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.logger import Logger

from vibed.couch import CouchConflict, CouchDatabase, CouchNotFound

_log = Logger(namespace="vibed.ratelimit")

T = TypeVar("T")

_TS_DIGITS = 15


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]


def _ts(seconds: float) -> str:
    return str(int(seconds * 1000)).zfill(_TS_DIGITS)


@frozen
class Hit:
    """One recorded event, so it can be given back."""

    id: str
    rev: str


@define
class RateLimiter:
    """Counts events per key in a sliding window; answers how long until the next is allowed."""

    db: CouchDatabase
    clock: Callable[[], float] = field(repr=False)

    async def retry_after(self, key: str, limit: int, window: int) -> int | None:
        """Seconds until ``key`` may act again, or None when it is under ``limit``."""
        now = self.clock()
        prefix = f"rl:{_key_hash(key)}:"
        result = await self.db.all_docs(
            startkey=prefix + _ts(now - window),
            endkey=prefix + "\ufff0",
            limit=limit,
        )
        rows: list[dict[str, Any]] = result.get("rows", [])
        if len(rows) < limit:
            return None
        oldest = int(rows[0]["id"].split(":")[2]) / 1000.0
        return max(1, int(oldest + window - now) + 1)

    async def hit(self, key: str) -> Hit:
        """Count one event for ``key`` now."""
        doc_id = f"rl:{_key_hash(key)}:{_ts(self.clock())}:{secrets.token_hex(6)}"
        result = await self.db.put({"_id": doc_id})
        return Hit(id=doc_id, rev=str(result.get("rev", "")))

    async def release(self, hit: Hit) -> None:
        """Un-count an event recorded by :meth:`hit` (gone already: nothing to do)."""
        try:
            await self.db.delete(hit.id, hit.rev)
        except (CouchNotFound, CouchConflict):
            pass

    async def reserve(self, keys: list[tuple[str, int]], window: int) -> tuple[list[Hit], int]:
        """Record one event for each ``(key, limit)`` unless that would pass a limit.

        Returns ``(hits, 0)`` when every key is within its limit, the events counted; else
        ``([], seconds to wait)`` with nothing counted. The count is read again after the
        events are written, so concurrent callers cannot all slip under the limit.
        """
        # The keys are independent: ask CouchDB about them concurrently.
        waits = await _all([self.retry_after(key, limit, window) for key, limit in keys])
        worst = max((w for w in waits if w is not None), default=None)
        if worst is not None:
            return [], worst  # already over: refuse without writing anything
        hits = await _all([self.hit(key) for key, _limit in keys])
        # Our own events are in the count now: more than ``limit`` means others raced us.
        waits = await _all([self.retry_after(key, limit + 1, window) for key, limit in keys])
        worst = max((w for w in waits if w is not None), default=None)
        if worst is not None:
            await _all([self.release(hit) for hit in hits])
            return [], worst
        return hits, 0

    async def purge(self, older_than: float) -> int:
        """Delete events older than ``older_than`` seconds; returns how many went."""
        cutoff = self.clock() - older_than
        removed = 0
        startkey: str | None = "rl:"
        while startkey is not None:
            page = await self.db.all_docs(startkey=startkey, endkey="rl:\ufff0", limit=500)
            rows = page.get("rows", [])
            stale = []
            for row in rows:
                parts = row["id"].split(":")
                if len(parts) == 4 and int(parts[2]) / 1000.0 < cutoff:
                    stale.append({"_id": row["id"], "_rev": row["value"]["rev"], "_deleted": True})
            if stale:
                await self.db.bulk_docs(stale)
                removed += len(stale)
            startkey = rows[-1]["id"] + "\u0000" if len(rows) == 500 else None
        return removed


async def _all(coroutines: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Await ``coroutines`` concurrently; their results in order (the first error raised)."""
    results: list[T] = await gatherResults(
        [ensureDeferred(c) for c in coroutines], consumeErrors=True
    ).addErrback(lambda f: f.value.subFailure.raiseException())
    return results
