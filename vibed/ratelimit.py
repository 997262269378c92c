"""Sliding-window rate limits kept in CouchDB, so every replica sees the same counts.

Each counted event is one small insert-only document, ``rl:<key hash>:<ms timestamp>:<random>``
(no read-modify-write, so concurrent replicas never conflict). Counting a key is one
``_all_docs`` key-range read from ``now - window`` to the end of the key's range, stopped at
the limit. Keys are hashed: an email address never becomes a document id in clear.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.logger import Logger

from vibed.couch import CouchDatabase

_log = Logger(namespace="vibed.ratelimit")

_TS_DIGITS = 15


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]


def _ts(seconds: float) -> str:
    return str(int(seconds * 1000)).zfill(_TS_DIGITS)


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

    async def hit(self, key: str) -> None:
        """Count one event for ``key`` now."""
        doc_id = f"rl:{_key_hash(key)}:{_ts(self.clock())}:{secrets.token_hex(6)}"
        await self.db.put({"_id": doc_id})

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
